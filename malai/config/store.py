"""The cluster manager's config store: ``cluster.toml``, its version, history and uploads.

Every accepted ``cluster.toml`` gets the next version number, a copy in
``history/<version>.toml`` and who and when in ``history/<version>.json``;
``state.json`` keeps the current version and hash (the publisher adds
per-machine delivery state to it). Changes happen under an ``flock`` on
``.config.lock``, so the daemon and a local ``malai config`` command never
interleave, and an upload is a compare-and-swap on the hash. A hand edit is
versioned (as a ``local edit``) before an upload replaces it, and an upload
passes the checks a rescan makes, and may not change who manages the cluster.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional

import attrs

from malai.atomic import locked, write_atomic
from malai.config.cluster import parse_cluster
from malai.config.errors import ConfigError
from malai.config.locate import KeyLocator
from malai.config.models import ClusterConfig
from malai.errors import MalaiError
from malai.identity import Identity

__all__ = [
    "KEY_FILE", "LOCAL_EDIT", "ClusterStore", "HashMismatch", "LocalEditInvalid", "Refusal", "Revision",
    "check_manager_config", "sha256_hex",
]

KEY_FILE = "cluster.private-key"
LOCAL_EDIT = "local edit"  # who, in history, for a hand edit of cluster.toml
UPLOADED = "uploaded cluster.toml"


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_manager_config(text: str, file: str, key: Optional[Identity]) -> ClusterConfig:
    """What a rescan checks of a manager's ``cluster.toml`` (and every upload): it validates and
    names ``key`` as the manager (``key`` None: the key could not be read, a problem of its own)."""
    config = parse_cluster(text, file)
    if key is not None and key.id52 != config.manager.id52:
        line = KeyLocator(text).line_of(("cluster_manager", "id52"))
        raise ConfigError.single(file, f"names {config.manager.id52} but the key {KEY_FILE} is {key.id52}; "
                                       "restore the matching key or fix the id52", line, "cluster_manager.id52")
    return config


class Refusal(MalaiError):
    """A refusal whose message may go to a remote editor as it is: it names no path."""


class HashMismatch(Refusal):
    """The config changed since the caller downloaded it."""

    def __init__(self, current: str, base: str):
        self.current = current
        super().__init__(
            f"cluster.toml changed since you downloaded it (your base {base[:16]}…, now {current[:16]}…); "
            "download it again, re-apply your edit and upload, or use --force to overwrite")


class LocalEditInvalid(Refusal):
    """``cluster.toml`` holds a hand edit that does not validate: it is neither served nor replaced."""

    def __init__(self, error: ConfigError):
        super().__init__("cluster.toml on the manager holds an edit that is not valid; it is not replaced "
                         f"until it is fixed there (`malai rescan --check` lists the problems):\n{error}")


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
        """Write ``state.json`` atomically, compact: indenting a manager's 10,000 machines took 5x as long."""
        write_atomic(self.state_file, (json.dumps(state, sort_keys=True) + "\n").encode(), mode=0o600)

    # -- versions ---------------------------------------------------------------
    def current(self) -> Revision:
        """The accepted ``cluster.toml`` (accepting a hand edit first, if valid)."""
        with self.locked():
            return self._current()

    def _current(self) -> Revision:
        try:
            return self._accept(self.config.read_text(), LOCAL_EDIT)
        except ConfigError as e:
            raise LocalEditInvalid(e) from None

    def _accept(self, text: str, by: str) -> Revision:
        """Make ``text`` (now in ``cluster.toml``) the current version, if it is not already."""
        state = self.load_state()
        sha = sha256_hex(text)
        if state.get("sha256") != sha:
            last = self._last_history()
            if last > int(state.get("version", 0)) and sha256_hex(self._history_file(last).read_text()) == sha:
                version = last  # stored already, when a crash kept state.json from saying so
            else:
                check_manager_config(text, "cluster.toml", Identity.load(self.folder / KEY_FILE))
                version = self._next_version(state)
                if self._meta(version).get("sha256") != sha:  # else an upload noted who before a crash
                    self._note(version, by, sha)
                write_atomic(self._history_file(version), text.encode(), mode=0o600, exclusive=True)
            state.update(version=version, sha256=sha, accepted_at=time.time())
            self.save_state(state)
        return Revision(int(state["version"]), sha, text)

    def _next_version(self, state: Dict[str, Any]) -> int:
        return max(int(state.get("version", 0)), self._last_history()) + 1

    def _last_history(self) -> int:
        versions = [int(p.stem) for p in self.history_dir.glob("*.toml") if p.stem.isascii() and p.stem.isdigit()]
        return max(versions, default=0)

    def _history_file(self, version: int) -> Path:
        return self.history_dir / f"{version}.toml"

    def _meta(self, version: int) -> Dict[str, Any]:
        try:
            return json.loads((self.history_dir / f"{version}.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _note(self, version: int, by: str, sha: str) -> None:
        meta = {"by": by, "at": time.time(), "sha256": sha}
        write_atomic(self.history_dir / f"{version}.json", (json.dumps(meta) + "\n").encode(), mode=0o600)

    def upload(self, text: str, base: Optional[str], force: bool = False, by: str = "local upload") -> Revision:
        """Replace ``cluster.toml`` with ``text`` if ``base`` is still its hash (or ``force``) and
        ``text`` passes a rescan's checks without changing the manager or the cluster name. A hand
        edit in the file is versioned first, so nothing is lost. ``by`` is who, for history."""
        uploaded = parse_cluster(text, UPLOADED)
        with self.locked():
            current = self._current()
            if not force and base != current.sha256:
                raise HashMismatch(current.sha256, base or "(none)")
            self._check_same_manager(text, uploaded, parse_cluster(current.text))
            check_manager_config(text, UPLOADED, Identity.load(self.folder / KEY_FILE))
            sha = sha256_hex(text)
            if sha == current.sha256:
                return current
            self._note(self._next_version(self.load_state()), by, sha)  # who, should a crash follow the write
            write_atomic(self.config, text.encode(), mode=0o644)
            return self._accept(text, by)

    @staticmethod
    def _check_same_manager(text: str, uploaded: ClusterConfig, current: ClusterConfig) -> None:
        locator = KeyLocator(text)
        for key, new, old, what in (
            ("id52", uploaded.manager.id52, current.manager.id52, "who manages the cluster"),
            ("cluster_name", uploaded.manager.cluster_name, current.manager.cluster_name, "the cluster's name"),
        ):
            if new != old:
                raise ConfigError.single(
                    UPLOADED, f"must stay {old!r}: an upload cannot change {what}; only the manager's "
                              "administrator can, by editing cluster.toml there",
                    locator.line_of(("cluster_manager", key)), f"cluster_manager.{key}")

    def history(self) -> List[Dict[str, Any]]:
        """Every version: its number, hash, when and by whom (``local edit`` for a hand edit)."""
        out = []
        for path in sorted(self.history_dir.glob("*.toml"), key=lambda p: int(p.stem) if p.stem.isascii() and p.stem.isdigit() else 0):
            if path.stem.isascii() and path.stem.isdigit():
                version, text = int(path.stem), path.read_text()
                meta = self._meta(version)
                out.append({"version": version, "sha256": sha256_hex(text),
                            "time": meta.get("at", path.stat().st_mtime), "by": meta.get("by", "")})
        return out

    def revision(self, version: int) -> Revision:
        path = self._history_file(version)
        try:
            text = path.read_text()
        except FileNotFoundError:
            known = ", ".join(str(h["version"]) for h in self.history()) or "none"
            raise Refusal(f"no version {version}; versions: {known}") from None
        return Revision(version, sha256_hex(text), text)
