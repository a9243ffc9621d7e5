"""``machine.toml``: a machine's personalized config; ``personalize`` makes it."""

import re
from typing import Any, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

import attrs
import tomlkit

from malai.config.cluster import (
    check_id52,
    model_fields,
    parse_machine_table,
    parse_manager_table,
)
from malai.config.models import ClusterConfig, DirectoryEntry, Machine, MachineConfig
from malai.config.reader import Source, check_addr
from malai.errors import MalaiError

__all__ = ["Personalizer", "parse_machine_config", "personalize", "render_machine_config"]


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


HEADER = "# Written by malai config push from the cluster manager; edits here are overwritten.\n"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_ESCAPED = re.compile(r'["\\\x00-\x1f\x7f]')


def render_machine_config(config: MachineConfig, cache: Optional[Dict[int, Tuple[object, str]]] = None) -> str:
    """``machine.toml`` for ``config``, as tomlkit lays it out, written section by section: a
    section many machines' configs share (the manager, a callers table, a directory entry,
    the relays, the members) is written once when they share a ``cache``."""
    cache = cache if cache is not None else {}
    parts = [_cached(cache, config.manager, lambda m: _table(("cluster_manager",), model_fields(m))),
             _machine_text(config.machine)]
    if config.callers:
        parts.append(_cached(cache, config.callers, lambda names: _table(("callers",), sorted(names.items()))))
    parts.extend(_cached(cache, entry, _directory_text) for entry in config.directory.values())
    if config.relays:
        parts.append(_cached(cache, config.relays, lambda relays: "\n".join(
            _table(("relay", r.name), [("id52", r.id52), *([("addrs", list(r.addrs))] if r.addrs else [])])
            for r in relays.values())))
    if config.members:
        parts.append(_cached(cache, config.members, lambda names: _table(("members",), sorted(names.items()))))
    return f"{HEADER}version = {config.version}\n" + "".join("\n" + part for part in parts)


def _cached(cache: Dict[int, Tuple[object, str]], part, render) -> str:
    """``render(part)``, once per object: the cache holds the object, so its id stays its own."""
    hit = cache.get(id(part))
    if hit is None or hit[0] is not part:
        hit = cache[id(part)] = (part, render(part))
    return hit[1]


def _machine_text(machine: Machine) -> str:
    tables = [_table(("machine", machine.name), model_fields(machine))]
    for key, entries in (("command", machine.commands), ("tcp", machine.tcp), ("http", machine.http)):
        tables.extend(_table(("machine", machine.name, key, e.name), model_fields(e)) for e in entries.values())
    return "\n".join(tables)


def _directory_text(entry: DirectoryEntry) -> str:
    items = [("id52", entry.id52)]
    items.extend((key, list(getattr(entry, key))) for key in ("addrs", "commands", "tcp", "http")
                 if getattr(entry, key))
    items.extend((key, True) for key in ("exec", "shell", "files") if getattr(entry, key))
    return _table(("directory", entry.name), items)


def _table(path: Tuple[str, ...], items: Iterable[Tuple[str, Any]]) -> str:
    return "[" + ".".join(map(_key, path)) + "]\n" + "".join(f"{_key(k)} = {_value(v)}\n" for k, v in items)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else tomlkit.key(key).as_string()


def _value(value) -> str:
    """A value as tomlkit writes it (tomlkit itself for a string that needs escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_value, value)) + "]"
    return f'"{value}"' if not _ESCAPED.search(value) else tomlkit.item(value).as_string()


def personalize(config: ClusterConfig, machine_name: str, version: int = 0) -> MachineConfig:
    """What ``machine_name`` may know: its own subtree with every expression
    expanded to ID52s, the names of those ID52s, and what it may reach."""
    return Personalizer(config).machine(machine_name, version)


class Personalizer:
    """Every machine's part of one cluster config, made together in time proportional to
    what they hold: each expression is expanded once, each machine's directory is built by
    walking, per machine, who may reach what on it, and the parts machines share (the
    manager, callers tables, directory entries, relays, members) are one object each."""

    def __init__(self, config: ClusterConfig):
        from malai.acl import Acl

        self.config = config
        self.acl = Acl.for_cluster(config)
        machines = config.machines.values()
        self.names = {m.id52: m.name for m in machines}
        self.manager = attrs.evolve(config.manager, config_editors=None)
        self.relays = {m.name: DirectoryEntry(m.name, m.id52, m.addrs) for m in machines if m.relay}
        self.members = {m.name: m.id52 for m in machines}  # a relay checks targets
        self._expanded: Dict[str, Tuple[str, FrozenSet[str]]] = {}
        self._callers: Dict[FrozenSet[str], Dict[str, str]] = {}
        self._directories: Optional[Dict[str, Dict[str, DirectoryEntry]]] = None

    def machine(self, name: str, version: int = 0) -> MachineConfig:
        if name not in self.config.machines:
            raise MalaiError(f"cluster {self.config.manager.cluster_name} has no machine {name!r}")
        me = self.config.machines[name]
        expanded = attrs.evolve(
            me,
            allow_from=self._expand(me.allow_from),
            allow_shell=self._expand(me.allow_shell),
            allow_files=self._expand(me.allow_files),
            commands={k: attrs.evolve(c, allow_from=self._expand(c.allow_from)) for k, c in me.commands.items()},
            tcp={k: attrs.evolve(s, allow_from=self._expand(s.allow_from)) for k, s in me.tcp.items()},
            http={k: attrs.evolve(s, allow_from=self._expand(s.allow_from)) for k, s in me.http.items()},
        )
        relays = self.relays
        if me.relay:
            relays = {k: v for k, v in relays.items() if k != name}
        return MachineConfig(self.manager, expanded, self._callers_of(me), self.directory(name), version, relays,
                             self.members if me.relay else {})

    def _members(self, expr: Optional[str]) -> FrozenSet[str]:
        if expr is None:
            return frozenset()
        if expr not in self._expanded:
            members = sorted(self.acl.members(expr))
            self._expanded[expr] = (", ".join(members), frozenset(members))
        return self._expanded[expr][1]

    def _expand(self, expr: Optional[str]) -> Optional[str]:
        if expr is None:
            return None
        self._members(expr)
        return self._expanded[expr][0]

    def _callers_of(self, me: Machine) -> Dict[str, str]:
        """The names of the ID52s that ``me``'s expressions allow (one dict per set of expressions)."""
        exprs = frozenset(_expressions(me))
        if exprs not in self._callers:
            seen = frozenset().union(*(self._members(e) for e in exprs))
            self._callers[exprs] = {self.names[i]: i for i in sorted(seen) if i in self.names}
        return self._callers[exprs]

    def walk(self) -> Iterator[None]:
        """Build every machine's directory, one step per machine whose callers it adds (a
        cooperative caller yields between steps)."""
        if self._directories is not None:
            return
        directories: Dict[str, Dict[str, DirectoryEntry]] = {n: {} for n in self.config.machines}
        for other in self.config.machines.values():
            for caller, entry in self._reachable(other).items():
                if caller != other.name:
                    directories[caller][other.name] = entry
            yield None
        self._directories = directories

    def directory(self, name: str) -> Dict[str, DirectoryEntry]:
        """What ``name`` may reach on the other machines, in cluster.toml's order."""
        if self._directories is None:
            for _ in self.walk():
                pass
        return self._directories[name]

    def _reachable(self, other: Machine) -> Dict[str, DirectoryEntry]:
        """By machine name, what each machine may reach on ``other`` (callers with equal rights share an entry)."""
        shell = other.allow_shell if other.allow_shell is not None else other.allow_from
        exec_, shell_, files = (self._members(e) for e in (
            other.allow_from, shell, other.allow_files if other.allow_files is not None else shell))
        services = [[(key, self._members(s.allow_from)) for key, s in entries.items()]
                    for entries in (other.commands, other.tcp, other.http)]
        who = exec_ | shell_ | files
        for kind in services:
            for _, ids in kind:
                who |= ids
        out: Dict[str, DirectoryEntry] = {}
        entries: Dict[tuple, DirectoryEntry] = {}
        for id52 in who:
            name = self.names.get(id52)
            if name is None:
                continue
            rights = (id52 in exec_, id52 in shell_, id52 in files,
                      *(tuple(key for key, ids in kind if id52 in ids) for kind in services))
            if rights not in entries:
                entries[rights] = DirectoryEntry(other.name, other.id52, other.addrs, *rights)
            out[name] = entries[rights]
        return out


def _expressions(machine: Machine) -> List[str]:
    """Every ``allow_from``-like expression of ``machine``'s own subtree."""
    out = [x for x in (machine.allow_from, machine.allow_shell, machine.allow_files) if x is not None]
    for entries in (machine.commands, machine.tcp, machine.http):
        out.extend(entry.allow_from for entry in entries.values() if entry.allow_from is not None)
    return out
