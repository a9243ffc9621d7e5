"""Frozen models of malai's config files (see docs/config.md)."""

from typing import Dict, Optional, Tuple

import attrs

__all__ = [
    "DEFAULT_HEARTBEAT", "ClusterConfig", "ClusterInfo", "ClusterManager", "Command", "DeviceConfig", "DirectoryEntry",
    "HttpService", "Machine", "MachineConfig", "TcpForward", "TcpService", "TorSettings",
]


DEFAULT_HEARTBEAT = 10  # seconds between a machine's heartbeats to its manager


@attrs.frozen
class ClusterManager:
    """``[cluster_manager]``: who owns the cluster."""

    id52: str
    cluster_name: str
    config_editors: Optional[str] = None
    heartbeat: int = DEFAULT_HEARTBEAT  # offline after three missed


@attrs.frozen
class Command:
    """``[machine.M.command.NAME]``: a named command and who may run it."""

    name: str
    command: str
    allow_from: Optional[str] = None
    username: Optional[str] = None
    shell: bool = False
    args: bool = False  # the caller's extra words are appended to the argv (see docs/exec.md)


@attrs.frozen
class TcpService:
    """``[machine.M.tcp.NAME]``: a TCP upstream on the machine."""

    name: str
    port: int
    allow_from: Optional[str] = None
    host: str = "127.0.0.1"
    proxy_protocol: bool = False


@attrs.frozen
class HttpService:
    """``[machine.M.http.NAME]``: an HTTP upstream on the machine."""

    name: str
    port: int
    allow_from: Optional[str] = None
    host: str = "127.0.0.1"
    inject_headers: bool = True
    secure: bool = False
    timeout: int = 60  # seconds to wait for the upstream's response head (then 504)


@attrs.frozen
class Machine:
    """``[machine.NAME]``: a member; with only an ``id52`` it is a client."""

    name: str
    id52: str
    addrs: Tuple[str, ...] = ()
    allow_from: Optional[str] = None
    allow_shell: Optional[str] = None
    allow_files: Optional[str] = None  # sftp, scp, rsync through the sftp subsystem; default: allow_shell
    username: Optional[str] = None
    relay: bool = False
    commands: Dict[str, Command] = attrs.field(factory=dict)
    tcp: Dict[str, TcpService] = attrs.field(factory=dict)
    http: Dict[str, HttpService] = attrs.field(factory=dict)


@attrs.frozen
class ClusterConfig:
    """``cluster.toml``: the cluster manager's source of truth."""

    manager: ClusterManager
    groups: Dict[str, str] = attrs.field(factory=dict)
    machines: Dict[str, Machine] = attrs.field(factory=dict)

    def machine_by_id52(self, id52: str) -> Optional[Machine]:
        for m in self.machines.values():
            if m.id52 == id52:
                return m
        return None


@attrs.frozen
class DirectoryEntry:
    """What a machine may reach on another member, as a client."""

    name: str
    id52: str
    addrs: Tuple[str, ...] = ()
    exec: bool = False
    shell: bool = False
    files: bool = False
    commands: Tuple[str, ...] = ()
    tcp: Tuple[str, ...] = ()
    http: Tuple[str, ...] = ()


@attrs.frozen
class MachineConfig:
    """``machine.toml``: one machine's personalized part of the cluster config.

    ``machine`` has every ``allow_from`` expanded to ID52s; ``callers`` names
    the ID52s that appear there; ``directory`` lists what this machine may reach.
    """

    manager: ClusterManager
    machine: Machine
    callers: Dict[str, str] = attrs.field(factory=dict)
    directory: Dict[str, DirectoryEntry] = attrs.field(factory=dict)
    version: int = 0  # the cluster config version it was made from
    relays: Dict[str, DirectoryEntry] = attrs.field(factory=dict)  # members with relay = true (not this one)
    members: Dict[str, str] = attrs.field(factory=dict)  # every member, name -> ID52: only for a relay


@attrs.frozen
class ClusterInfo:
    """``cluster-info.toml``: how a machine finds its cluster manager."""

    cluster_alias: str
    manager_id52: str
    addrs: Tuple[str, ...] = ()
    machine_name: Optional[str] = None


@attrs.frozen
class TcpForward:
    """``[tcp.NAME]`` in ``malai.toml``: a local port reaching a remote service."""

    name: str
    local: str
    remote: str


@attrs.frozen
class TorSettings:
    """``[tor]`` in ``malai.toml``: launch a Tor of our own, or use one at ``control``."""

    mode: str  # "launch" or "control"
    control: Optional[str] = None


@attrs.frozen
class LinkLimits:
    """``[links]`` of ``malai.toml``: the limits of every multiplexed peer link (read at start)."""

    max_streams: int = 4096  # streams a peer may have open on one link at once
    ping_interval: int = 5  # seconds between PINGs; three silent intervals close a link
    drain_time: int = 10  # seconds open streams get to finish on ``malai stop``


@attrs.frozen
class DeviceConfig:
    """``malai.toml``: device-wide settings."""

    aliases: Dict[str, str] = attrs.field(factory=dict)
    tcp: Dict[str, TcpForward] = attrs.field(factory=dict)
    http_listen: Optional[str] = None
    listen: Tuple[str, ...] = ()
    tor: Optional["TorSettings"] = None  # None: Tor is off
    metrics: Optional[str] = None  # ``[metrics] listen``: where /metrics is served; None: off
    lan: bool = True  # ``[discovery] lan``: announce and find identities on the LAN (multicast DNS)
    links: LinkLimits = LinkLimits()
