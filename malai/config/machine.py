"""``machine.toml``: a machine's personalized config; ``personalize`` makes it."""

from typing import Dict

import attrs
import tomlkit

from malai.config.cluster import (
    check_id52,
    parse_machine_table,
    parse_manager_table,
    render_machine_into,
    render_manager,
)
from malai.config.models import ClusterConfig, DirectoryEntry, Machine, MachineConfig
from malai.config.reader import Source, check_addr
from malai.errors import MalaiError

__all__ = ["parse_machine_config", "personalize", "render_machine_config"]


def parse_machine_config(text: str, file: str = "machine.toml") -> MachineConfig:
    source = Source(file, text)
    root = source.root()
    version = root.integer("version", default=0)
    manager = parse_manager_table(root)
    machines = root.tables("machine")
    if len(machines) != 1:
        source.problem(("machine",), "must hold exactly one [machine.NAME] table, this machine's")
    machine = None
    for name, t in machines.items():
        machine = parse_machine_table(name, t)
    callers = _names(root, "callers")
    directory = {}
    for name, t in root.tables("directory").items():
        directory[name] = DirectoryEntry(
            name=name,
            id52=t.string("id52", required=True, check=check_id52) or "",
            addrs=t.strings("addrs", check=check_addr),
            exec=t.boolean("exec", False),
            shell=t.boolean("shell", False),
            files=t.boolean("files", False),
            commands=t.strings("commands"),
            tcp=t.strings("tcp"),
            http=t.strings("http"),
        )
        t.done()
    relays = {}
    for name, t in root.tables("relay").items():
        relays[name] = DirectoryEntry(name=name, id52=t.string("id52", required=True, check=check_id52) or "",
                                      addrs=t.strings("addrs", check=check_addr))
        t.done()
    members = _names(root, "members")
    root.done()
    source.raise_problems()
    assert manager is not None and machine is not None
    return MachineConfig(manager, machine, callers, directory, version, relays, members)


def _names(root, key: str) -> Dict[str, str]:
    """A table of ``name = "<id52>"`` lines."""
    out: Dict[str, str] = {}
    table = root.table(key)
    if table is not None:
        for name in table.data:
            value = table.string(name, check=check_id52)
            if value:
                out[name] = value
        table.done()
    return out


def _render_names(doc, key: str, names: Dict[str, str]) -> None:
    if names:
        table = tomlkit.table()
        for name, id52 in sorted(names.items()):
            table[name] = id52
        doc[key] = table


def render_machine_config(config: MachineConfig) -> str:
    doc = tomlkit.document()
    doc.add(tomlkit.comment("Written by malai config push from the cluster manager; edits here are overwritten."))
    doc["version"] = config.version
    render_manager(doc, config.manager)
    machines = tomlkit.table(is_super_table=True)
    render_machine_into(machines, config.machine)
    doc["machine"] = machines
    _render_names(doc, "callers", config.callers)
    if config.directory:
        directory = tomlkit.table(is_super_table=True)
        for entry in config.directory.values():
            t = tomlkit.table()
            t["id52"] = entry.id52
            for key in ("addrs", "commands", "tcp", "http"):
                if getattr(entry, key):
                    t[key] = list(getattr(entry, key))
            for key in ("exec", "shell", "files"):
                if getattr(entry, key):
                    t[key] = True
            directory[entry.name] = t
        doc["directory"] = directory
    if config.relays:
        relays = tomlkit.table(is_super_table=True)
        for entry in config.relays.values():
            t = tomlkit.table()
            t["id52"] = entry.id52
            if entry.addrs:
                t["addrs"] = list(entry.addrs)
            relays[entry.name] = t
        doc["relay"] = relays
    _render_names(doc, "members", config.members)
    return tomlkit.dumps(doc)


def personalize(config: ClusterConfig, machine_name: str, version: int = 0) -> MachineConfig:
    """What ``machine_name`` may know: its own subtree with every expression
    expanded to ID52s, the names of those ID52s, and what it may reach."""
    from malai.acl import Acl

    if machine_name not in config.machines:
        raise MalaiError(f"cluster {config.manager.cluster_name} has no machine {machine_name!r}")
    acl = Acl.for_cluster(config)
    me = config.machines[machine_name]
    names = {m.id52: m.name for m in config.machines.values()}
    seen: set = set()

    def expand(expr):
        if expr is None:
            return None
        members = sorted(acl.members(expr))
        seen.update(members)
        return ", ".join(members)

    expanded = attrs.evolve(
        me,
        allow_from=expand(me.allow_from),
        allow_shell=expand(me.allow_shell),
        allow_files=expand(me.allow_files),
        commands={k: attrs.evolve(c, allow_from=expand(c.allow_from)) for k, c in me.commands.items()},
        tcp={k: attrs.evolve(s, allow_from=expand(s.allow_from)) for k, s in me.tcp.items()},
        http={k: attrs.evolve(s, allow_from=expand(s.allow_from)) for k, s in me.http.items()},
    )
    callers = {names[i]: i for i in sorted(seen) if i in names}
    directory = {}
    for other in config.machines.values():
        if other.name != machine_name:
            entry = _reachable(acl, other, me.id52)
            if entry is not None:
                directory[other.name] = entry
    manager = attrs.evolve(config.manager, config_editors=None)
    relays = {m.name: DirectoryEntry(m.name, m.id52, m.addrs) for m in config.machines.values()
              if m.relay and m.name != machine_name}
    members = {m.name: m.id52 for m in config.machines.values()} if me.relay else {}  # a relay checks targets
    return MachineConfig(manager, expanded, callers, directory, version, relays, members)


def _reachable(acl, other: Machine, me: str):
    entry = DirectoryEntry(
        name=other.name,
        id52=other.id52,
        addrs=other.addrs,
        exec=acl.check("", other.allow_from, me).allowed,
        shell=acl.can_run(other, me, []).allowed,
        files=acl.can_use_files(other, me).allowed,
        commands=tuple(c for c in other.commands if acl.can_run(other, me, [c]).allowed),
        tcp=tuple(s for s in other.tcp if acl.can_reach(other, "tcp", s, me).allowed),
        http=tuple(s for s in other.http if acl.can_reach(other, "http", s, me).allowed),
    )
    if entry.exec or entry.shell or entry.files or entry.commands or entry.tcp or entry.http:
        return entry
    return None
