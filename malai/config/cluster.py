"""``cluster.toml``: parse, validate (ACL references included) and render."""

from typing import Any, Dict, Iterator, Optional, Tuple

import attrs
import tomlkit

from malai.config.models import (
    DEFAULT_HEARTBEAT,
    ClusterConfig,
    ClusterManager,
    Command,
    HttpService,
    Machine,
    TcpService,
)
from malai.config.reader import Source, Table, check_addr, check_name, check_username
from malai.identity import ID52Error, parse_id52

__all__ = [
    "parse_cluster", "parse_machine_table", "parse_manager_table",
    "render_cluster", "render_machine_into", "render_manager", "check_id52", "model_fields",
]


def check_id52(value: str) -> Optional[str]:
    try:
        parse_id52(value)
    except ID52Error as e:
        return str(e)
    return None


def _id52(table: Table, key: str = "id52") -> Optional[str]:
    value = table.string(key, required=True, check=check_id52)
    return parse_id52(value) if value else None


def parse_manager_table(root: Table) -> Optional[ClusterManager]:
    t = root.table("cluster_manager", required=True)
    if t is None:
        return None
    id52 = _id52(t)
    name = t.string("cluster_name", required=True, check=check_name)
    editors = t.string("config_editors")
    heartbeat = t.integer("heartbeat", low=1, high=3600, default=DEFAULT_HEARTBEAT)
    t.done()
    if id52 is None or name is None:
        return None
    return ClusterManager(id52, name, editors, heartbeat)


def _port(t: Table) -> Optional[int]:
    return t.integer("port", required=True, low=1, high=65535)


def parse_machine_table(name: str, t: Table) -> Optional[Machine]:
    """One ``[machine.NAME]`` subtree, shared by cluster.toml and machine.toml."""
    id52 = _id52(t)
    commands: Dict[str, Command] = {}
    for cname, ct in t.tables("command").items():
        command = ct.string("command", required=True)
        if command is not None and not command.strip():
            ct.source.problem(ct.path + ("command",), "must not be empty")
        commands[cname] = Command(
            cname, command or "", ct.string("allow_from"),
            ct.string("username", check=check_username), ct.boolean("shell", False), ct.boolean("args", False),
        )
        ct.done()
    tcp = {}
    for sname, st in t.tables("tcp").items():
        tcp[sname] = TcpService(
            sname, _port(st) or 0, st.string("allow_from"), st.string("host", default="127.0.0.1"),
            st.boolean("proxy_protocol", False),
        )
        st.done()
    http = {}
    for sname, st in t.tables("http").items():
        http[sname] = HttpService(
            sname, _port(st) or 0, st.string("allow_from"), st.string("host", default="127.0.0.1"),
            st.boolean("inject_headers", True), st.boolean("secure", False),
            st.integer("timeout", low=1, high=86400, default=60),
        )
        st.done()
    machine = Machine(
        name=name,
        id52=id52 or "",
        addrs=t.strings("addrs", check=check_addr),
        allow_from=t.string("allow_from"),
        allow_shell=t.string("allow_shell"),
        allow_files=t.string("allow_files"),
        username=t.string("username", check=check_username),
        relay=t.boolean("relay", False),
        commands=commands, tcp=tcp, http=http,
    )
    t.done()
    return machine if id52 else None


def parse_cluster(text: str, file: str = "cluster.toml") -> ClusterConfig:
    """Parse and validate ``cluster.toml``; raise ConfigError with every problem."""
    from malai.acl import Acl  # acl depends on the models, not on this parser

    source = Source(file, text)
    root = source.root()
    manager = parse_manager_table(root)
    groups: Dict[str, str] = {}
    for gname, gt in root.tables("group").items():
        members = gt.string("members", required=True)
        groups[gname] = members or ""
        gt.done()
    machines: Dict[str, Machine] = {}
    seen_id52: Dict[str, str] = {}
    for mname, mt in root.tables("machine").items():
        machine = parse_machine_table(mname, mt)
        if machine is None:
            continue
        if machine.id52 in seen_id52:
            source.problem(mt.path + ("id52",), f"same ID52 as machine {seen_id52[machine.id52]}")
        seen_id52[machine.id52] = mname
        if mname in groups:
            source.problem(mt.path, f"{mname!r} is both a machine and a group name")
        machines[mname] = machine
    root.done()
    if manager is None:
        source.raise_problems()
    assert manager is not None
    config = ClusterConfig(manager, groups, machines)
    acl = Acl.for_cluster(config)
    for path, expr in _expressions(config):
        for problem in acl.term_problems(expr):
            source.problem(path, problem)
    for group, chain in acl.cycles():
        source.problem(("group", group, "members"), f"group cycle: {chain}")
    source.raise_problems()
    return config


def _expressions(config: ClusterConfig):
    """Every ``allow_from``-like expression with its key path."""
    if config.manager.config_editors is not None:
        yield ("cluster_manager", "config_editors"), config.manager.config_editors
    for gname, members in config.groups.items():
        yield ("group", gname, "members"), members
    for m in config.machines.values():
        base = ("machine", m.name)
        for key in ("allow_from", "allow_shell", "allow_files"):
            if getattr(m, key) is not None:
                yield base + (key,), getattr(m, key)
        for kind, entries in (("command", m.commands), ("tcp", m.tcp), ("http", m.http)):
            for entry in entries.values():
                if entry.allow_from is not None:
                    yield base + (kind, entry.name, "allow_from"), entry.allow_from


_NESTED = ("commands", "tcp", "http")
_TABLE_NAMES = {"commands": "command", "tcp": "tcp", "http": "http"}


def model_fields(model) -> Iterator[Tuple[str, Any]]:
    """A model's fields as a table holds them: required ones always, others when not their default."""
    for field in attrs.fields(type(model)):
        if field.name == "name" or field.name in _NESTED:
            continue
        value = getattr(model, field.name)
        required = field.default is attrs.NOTHING
        if value is not None and (required or value != field.default):
            yield field.name, list(value) if isinstance(value, tuple) else value


def _fields_table(model) -> "tomlkit.items.Table":
    t = tomlkit.table()
    for key, value in model_fields(model):
        t[key] = value
    return t


def render_machine_into(parent, machine: Machine) -> None:
    """Add ``machine`` as ``parent[machine.name]`` (a tomlkit super-table)."""
    t = _fields_table(machine)
    for attr in _NESTED:
        entries = getattr(machine, attr)
        if entries:
            sup = tomlkit.table(is_super_table=True)
            for entry in entries.values():
                sup[entry.name] = _fields_table(entry)
            t[_TABLE_NAMES[attr]] = sup
    parent[machine.name] = t


def render_manager(doc, manager: ClusterManager) -> None:
    doc["cluster_manager"] = _fields_table(manager)


def render_cluster(config: ClusterConfig) -> str:
    doc = tomlkit.document()
    render_manager(doc, config.manager)
    if config.groups:
        groups = tomlkit.table(is_super_table=True)
        for name, members in config.groups.items():
            gt = tomlkit.table()
            gt["members"] = members
            groups[name] = gt
        doc["group"] = groups
    if config.machines:
        machines = tomlkit.table(is_super_table=True)
        for machine in config.machines.values():
            render_machine_into(machines, machine)
        doc["machine"] = machines
    return tomlkit.dumps(doc)

