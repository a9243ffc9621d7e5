"""``malai.toml``: device-wide aliases, forwards and daemon settings."""

from typing import Dict, Optional

from malai.config.models import DeviceConfig, LinkLimits, TcpForward, TorSettings
from malai.config.reader import Source, check_addr, check_name

__all__ = ["RESERVED_NAMES", "parse_device", "check_target", "check_remote"]

#: Subcommands of the ``malai`` CLI; an alias may not shadow one.
RESERVED_NAMES = frozenset({
    "acl", "cluster", "config", "cp", "daemon", "forward", "help", "identity", "info", "keygen", "logs", "machine",
    "machines", "open", "ping", "rescan", "service", "socks", "ssh", "status", "stop", "tcp", "tcp-bridge",
})


def check_target(value: str) -> Optional[str]:
    """``<machine>.<cluster>`` (wildcards allowed in the machine part)."""
    parts = value.split(".")
    if len(parts) != 2 or not all(parts):
        return f"{value!r} is not a target: write <machine>.<cluster>"
    return check_name(parts[1])


def check_remote(value: str) -> Optional[str]:
    """``<service>.<machine>.<cluster>``."""
    parts = value.split(".")
    if len(parts) != 3:
        return f"{value!r} is not a service address: write <service>.<machine>.<cluster>"
    for part in parts:
        error = check_name(part)
        if error:
            return error
    return None


def _check_alias(value: str) -> Optional[str]:
    words = value.split()
    if not words:
        return "an alias must name a target: <machine>.<cluster> [command…]"
    return check_target(words[0])


def parse_device(text: str, file: str = "malai.toml") -> DeviceConfig:
    source = Source(file, text)
    root = source.root()
    aliases: Dict[str, str] = {}
    at = root.table("aliases")
    if at is not None:
        for name in list(at.data):
            value = at.string(name, check=_check_alias)
            if name in RESERVED_NAMES:
                source.problem(at.path + (name,), f"alias {name!r} would shadow the `malai {name}` command; rename it")
            elif check_name(name):
                source.problem(at.path + (name,), check_name(name) or "")
            elif value:
                aliases[name] = value
        at.done()
    tcp = {}
    for name, t in root.tables("tcp").items():
        local = t.string("local", required=True, check=check_addr)
        remote = t.string("remote", required=True, check=check_remote)
        if local and remote:
            tcp[name] = TcpForward(name, local, remote)
        t.done()
    http_listen = None
    ht = root.table("http")
    if ht is not None:
        http_listen = ht.string("listen", check=check_addr)
        ht.done()
    listen: tuple = ()
    dt = root.table("daemon")
    if dt is not None:
        listen = dt.strings("listen", check=lambda v: None if v.strip() else "an endpoint must not be empty")
        dt.done()
    tor = None
    tt = root.table("tor")
    if tt is not None:
        mode = tt.string("mode", check=lambda v: None if v in ("off", "launch") else
                         f"{v!r} is not a Tor mode: \"off\" or \"launch\" (or set control = ENDPOINT instead)")
        control = tt.string("control", check=lambda v: None if v.strip() else "an endpoint must not be empty")
        if mode == "launch" and control:
            source.problem(tt.path + ("control",), "mode = \"launch\" starts a Tor of its own: drop control, "
                                                   "or drop mode to use the Tor at control")
        elif control:
            tor = TorSettings("control", control)
        elif mode == "launch":
            tor = TorSettings("launch")
        tt.done()
    metrics = None
    mt = root.table("metrics")
    if mt is not None:
        metrics = mt.string("listen", required=True,
                            check=lambda v: None if v.strip() else "an endpoint must not be empty")
        mt.done()
    lan = True
    discovery = root.table("discovery")
    if discovery is not None:
        lan = discovery.boolean("lan", True)
        discovery.done()
    links = LinkLimits()
    lt = root.table("links")
    if lt is not None:
        links = LinkLimits(lt.integer("max_streams", low=1, high=1 << 20, default=links.max_streams),
                           lt.integer("ping_interval", low=1, high=3600, default=links.ping_interval),
                           lt.integer("drain_time", low=0, high=3600, default=links.drain_time))
        lt.done()
    root.done()
    source.raise_problems()
    return DeviceConfig(aliases, tcp, http_listen, listen, tor, metrics, lan, links)
