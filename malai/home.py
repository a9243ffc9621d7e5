"""MALAI_HOME: where a device keeps its keys, configs, state and sockets.

See DESIGN.md for the layout. ``scan`` reads every cluster folder and reports
each one's role, identity and problems without letting one broken cluster
hide the others.
"""

import os
from pathlib import Path
from typing import List, Optional, Tuple

import attrs

from malai.atomic import remove_stale_temp_files
from malai.config import (
    ConfigError,
    parse_cluster_info,
    parse_device,
    parse_machine_config,
)
from malai.config.locate import KeyLocator
from malai.config.models import ClusterConfig, ClusterInfo, DeviceConfig, MachineConfig
from malai.config.store import KEY_FILE, check_manager_config, sha256_hex
from malai.errors import MalaiError
from malai.identity import Identity
from malai.paths import default_home

__all__ = ["ClusterEntry", "Home", "default_home"]

MANAGER = "manager"
MACHINE = "machine"


@attrs.frozen
class ClusterEntry:
    """What a scan found in ``clusters/<alias>/``."""

    alias: str
    path: Path
    role: Optional[str]  # "manager", "machine", or None when undecidable
    identity: Optional[Identity] = None
    cluster: Optional[ClusterConfig] = None  # the manager's cluster.toml
    machine: Optional[MachineConfig] = None  # the machine's machine.toml (None: waiting)
    info: Optional[ClusterInfo] = None  # the machine's cluster-info.toml
    problems: Tuple[str, ...] = ()
    sha256: str = ""  # of cluster.toml: a comment-only edit is a change too (it gets a version)

    @property
    def id52(self) -> Optional[str]:
        return self.identity.id52 if self.identity else None

    @property
    def ok(self) -> bool:
        return not self.problems


@attrs.frozen
class Home:
    """A MALAI_HOME folder and the paths inside it."""

    root: Path

    @classmethod
    def default(cls) -> "Home":
        return cls(default_home())

    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def device_config(self) -> Path:
        return self.root / "malai.toml"

    @property
    def lock(self) -> Path:
        return self.root / "malai.lock"

    @property
    def socket(self) -> Path:
        return self.root / "malai.socket"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def cluster_dir(self, alias: str) -> Path:
        return self.clusters / alias

    def ensure(self) -> None:
        """Create the home (0700) and its clusters folder; remove the temp files that writers
        killed mid-write left there (the daemon calls this as it starts)."""
        self.clusters.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for folder in [self.root, *self.clusters.iterdir(), *self.clusters.glob("*/history")]:
            if folder.is_dir():
                remove_stale_temp_files(folder)

    def new_cluster(self, alias: str, key_file: str) -> Tuple[Path, Identity]:
        """Create ``clusters/<alias>/`` (0700) with a new key in ``key_file``; refuse an existing one."""
        self.ensure()
        folder = self.cluster_dir(alias)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            raise MalaiError(f"cluster {alias!r} already exists at {folder}; "
                             "pick another name or remove that folder") from None
        identity = Identity.generate()
        identity.save(folder / key_file)
        return folder, identity

    def load_device(self) -> DeviceConfig:
        try:
            text = self.device_config.read_text()
        except FileNotFoundError:
            return DeviceConfig()
        return parse_device(text, str(self.device_config))

    def aliases(self) -> List[str]:
        if not self.clusters.is_dir():
            return []
        return sorted(p.name for p in self.clusters.iterdir() if p.is_dir() and not p.name.startswith("."))

    def scan(self, only: Optional[str] = None) -> List[ClusterEntry]:
        """Every cluster (or just ``only``), each with its problems."""
        if only is None:
            return [scan_cluster(alias, self.cluster_dir(alias)) for alias in self.aliases()]
        # one folder looked at, not all listed: a push to one of many clusters rescans just that one
        if not only or only[0] == "." or "/" in only or "\0" in only or not self.cluster_dir(only).is_dir():
            raise MalaiError(f"no cluster {only!r} in {self.clusters}; clusters here: "
                             f"{', '.join(self.aliases()) or 'none'}")
        return [scan_cluster(only, self.cluster_dir(only))]


def scan_cluster(alias: str, path: Path) -> ClusterEntry:
    """Read one cluster folder: role from the files present, then config and key."""
    cluster_toml, machine_toml, info_toml = (path / n for n in ("cluster.toml", "machine.toml", "cluster-info.toml"))
    if cluster_toml.exists() and machine_toml.exists():
        return ClusterEntry(alias, path, None, problems=(
            f"{path}: holds both cluster.toml (manager) and machine.toml (machine); "
            "a device is one or the other in a cluster: move one of them away",
        ))
    problems: List[str] = []
    if cluster_toml.exists():
        identity = _identity(path / KEY_FILE, problems)
        text = _read(cluster_toml, problems)
        cluster = _parse(text, cluster_toml, lambda t, f: check_manager_config(t, f, identity), problems)
        return ClusterEntry(alias, path, MANAGER, identity, cluster=cluster, problems=tuple(problems),
                            sha256=sha256_hex(text) if text is not None else "")
    if machine_toml.exists() or info_toml.exists():
        info = _load(info_toml, parse_cluster_info, problems) if info_toml.exists() else None
        machine = _load(machine_toml, parse_machine_config, problems) if machine_toml.exists() else None
        identity = _identity(path / "machine.private-key", problems)
        if machine is not None and identity is not None and identity.id52 != machine.machine.id52:
            key_path = ("machine", machine.machine.name, "id52")
            line = KeyLocator(machine_toml.read_text()).line_of(key_path)
            problems.append(
                f"{machine_toml}:{line}: {'.'.join(key_path)}: names {machine.machine.id52} but the key "
                f"machine.private-key is {identity.id52}; restore the matching key or fix the id52"
            )
        return ClusterEntry(alias, path, MACHINE, identity, machine=machine, info=info, problems=tuple(problems))
    return ClusterEntry(alias, path, None, problems=(
        f"{path}: neither cluster.toml nor machine.toml nor cluster-info.toml; "
        "run `malai cluster init` or `malai machine init`, or remove the folder",
    ))


def _read(path: Path, problems: List[str]) -> Optional[str]:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: cannot read: {e}")
    return None


def _parse(text: Optional[str], path: Path, parse, problems: List[str]):
    if text is None:
        return None
    try:
        return parse(text, str(path))
    except ConfigError as e:
        problems.extend(str(p) for p in e.problems)
    return None


def _load(path: Path, parse, problems: List[str]):
    return _parse(_read(path, problems), path, parse, problems)


def _identity(path: Path, problems: List[str]) -> Optional[Identity]:
    try:
        return Identity.load(path)
    except MalaiError as e:
        problems.append(str(e))
        return None
