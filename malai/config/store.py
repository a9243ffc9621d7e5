"""The cluster manager's config store: ``cluster.toml``, its version, history and uploads.

Every accepted ``cluster.toml`` gets the next version number and a copy in
``history/<version>.toml``; ``state.json`` keeps the current version and hash
(the publisher adds per-machine delivery state to it). Changes happen under
an ``flock`` on ``.config.lock``, so the daemon and a local ``malai config``
command never interleave, and an upload is a compare-and-swap on the hash.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional

import attrs

from malai.atomic import locked, write_atomic
from malai.config.cluster import parse_cluster
from malai.errors import MalaiError

__all__ = ["ClusterStore", "HashMismatch", "Revision", "sha256_hex"]


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class HashMismatch(MalaiError):
    """The config changed since the caller downloaded it."""

    def __init__(self, current: str, base: str):
        self.current = current
        super().__init__(
            f"cluster.toml changed since you downloaded it (your base {base[:16]}…, now {current[:16]}…); "
            "download it again, re-apply your edit and upload, or use --force to overwrite")


@attrs.frozen
class Revision:
    version: int
    sha256: str
    text: str


class ClusterStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = self.folder / "cluster.toml"
        self.state_file = self.folder / "state.json"
        self.history_dir = self.folder / "history"

    def locked(self) -> ContextManager[None]:
        return locked(self.folder / ".config.lock")

    # -- state.json -----------------------------------------------------------
    def load_state(self) -> Dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {"version": 0, "sha256": "", "machines": {}}
        except ValueError as e:
            raise MalaiError(f"{self.state_file}: not valid JSON ({e}); restore it or remove it "
                             "(the next version starts again from history)") from None

    def save_state(self, state: Dict[str, Any]) -> None:
        write_atomic(self.state_file, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(), mode=0o600)

    # -- versions ---------------------------------------------------------------
    def current(self) -> Revision:
        """The accepted ``cluster.toml`` (accepting a hand edit first, if valid)."""
        with self.locked():
            return self._accept(self.config.read_text())

    def _accept(self, text: str) -> Revision:
        state = self.load_state()
        sha = sha256_hex(text)
        if state.get("sha256") != sha:
            parse_cluster(text, str(self.config))  # never version an invalid file
            state["version"] = max(int(state.get("version", 0)), self._last_history()) + 1
            state["sha256"] = sha
            state["accepted_at"] = time.time()
            write_atomic(self.history_dir / f"{state['version']}.toml", text.encode(), mode=0o600)
            self.save_state(state)
        return Revision(int(state["version"]), sha, text)

    def _last_history(self) -> int:
        versions = [int(p.stem) for p in self.history_dir.glob("*.toml") if p.stem.isdigit()]
        return max(versions, default=0)

    def upload(self, text: str, base: Optional[str], force: bool = False) -> Revision:
        """Replace ``cluster.toml`` if ``base`` is still its hash (or ``force``) and ``text`` is valid."""
        parse_cluster(text, "uploaded cluster.toml")
        with self.locked():
            current = self.config.read_text()
            current_sha = sha256_hex(current)
            if not force and base != current_sha:
                raise HashMismatch(current_sha, base or "(none)")
            if current_sha != sha256_hex(text):
                write_atomic(self.config, text.encode(), mode=0o644)
            return self._accept(text)

    def history(self) -> List[Dict[str, Any]]:
        out = []
        for path in sorted(self.history_dir.glob("*.toml"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
            if path.stem.isdigit():
                text = path.read_text()
                out.append({"version": int(path.stem), "sha256": sha256_hex(text), "time": path.stat().st_mtime})
        return out

    def revision(self, version: int) -> Revision:
        path = self.history_dir / f"{version}.toml"
        try:
            text = path.read_text()
        except FileNotFoundError:
            known = ", ".join(str(h["version"]) for h in self.history()) or "none"
            raise MalaiError(f"no version {version} in {self.history_dir}; versions: {known}") from None
        return Revision(version, sha256_hex(text), text)
