"""``ClusterService``: one cluster this device belongs to, as manager or machine."""

from collections import Counter
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.protocols import amp

from malai.acl import Acl, Decision, expression_terms
from malai.audit import AuditLog
from malai.config.invites import InviteStore
from malai.config.models import DEFAULT_HEARTBEAT
from malai.config.store import ClusterStore
from malai.errors import MalaiError
from malai.home import MANAGER, ClusterEntry
from malai.identity import ID52Error, Identity, parse_id52
from malai.p2p.link import PeerAddress
from malai.peer.joining import JoinLocator
from malai.peer.relaying import Relayer
from malai.peer.responders import ClusterResponder, StreamResponder
from malai.peer.streams import StreamRefused
from malai.services.agent import MachineAgent
from malai.services.heartbeats import MachineHealth
from malai.services.publisher import ConfigPublisher

__all__ = ["ClusterService"]


class ClusterService(MultiService):
    """Holds a cluster's identity and config, decides which peers it talks to."""

    log = Logger()

    def __init__(self, entry: ClusterEntry, daemon=None):
        """``daemon`` (the root service: reactor, pool, rescan) gives the cluster its
        working parts: a publisher on the manager, an agent on a machine."""
        super().__init__()
        self.setName(entry.alias)
        self.entry = entry
        self.daemon = daemon
        self._derived: Dict[str, Any] = {}  # what peers(), members() and name_of() derive from the entry
        self.publisher: Optional[ConfigPublisher] = None
        self.agent: Optional[MachineAgent] = None
        self.health: Optional[MachineHealth] = None
        if daemon is None:
            return
        if entry.role == MANAGER:
            self.publisher = ConfigPublisher(daemon.reactor, self, daemon.pool, self.store)
            self.publisher.setServiceParent(self)
            self.health = MachineHealth(daemon.reactor, entry.path / "machines.json")
            self.health.setServiceParent(self)
        else:
            self.agent = MachineAgent(daemon.reactor, self, daemon.pool)
            self.agent.setServiceParent(self)

    @property
    def identity(self) -> Identity:
        assert self.entry.identity is not None
        return self.entry.identity

    @property
    def role(self) -> str:
        assert self.entry.role is not None
        return self.entry.role

    @property
    def audit(self) -> AuditLog:
        metrics = getattr(self.daemon, "metrics", None)
        return AuditLog(self.daemon.home.log_dir / "audit.jsonl", metrics.audit if metrics is not None else None)

    @property
    def store(self) -> ClusterStore:
        return ClusterStore(self.entry.path)

    def reconfigure(self, entry: ClusterEntry) -> None:
        """Take a new valid config for the same identity, in place."""
        self.entry = entry
        self._derived = {}
        self.log.info("{cluster} reloaded", cluster=self.name)
        if self.publisher is not None and self.publisher.running:
            self.publisher.publish()
        if self.agent is not None:
            self.agent.sync()
        if self.health is not None and entry.cluster is not None:
            self.health.forget_all_but(m.id52 for m in entry.cluster.machines.values())

    def config_changed(self) -> None:
        """Our config file was just written (upload, push): apply it like a rescan."""
        if self.daemon is not None:
            self.daemon.log_reports(self.daemon.rescan(self.name))

    def peer_connected(self, peer: str, hints: List[str]) -> None:
        if self.publisher is not None:
            self.publisher.peer_connected(peer, hints)

    # -- what peers may ask ---------------------------------------------------
    def accept_push(self, envelope, peer: str) -> str:
        if self.agent is None:
            raise MalaiError(f"{self.name}: this device manages the cluster; it does not take config pushes")
        return self.agent.accept_push(envelope, peer)

    def may_edit_config(self, peer: str) -> Decision:
        if self.entry.cluster is None:
            reason = f"this device does not manage {self.name}; ask its cluster manager"
            return Decision(False, "cluster_manager.config_editors", reason, reason)
        return Acl.for_cluster(self.entry.cluster).can_edit_config(self.entry.cluster.manager.config_editors, peer)

    # -- relaying (see malai.peer.relaying) -------------------------------------
    def relayer(self) -> Relayer:
        e = self.entry
        if e.cluster is None and (e.machine is None or not e.machine.machine.relay):
            raise StreamRefused(f"this device does not relay for {self.name} (relay = true is not set for it)",
                                "RELAY_REFUSED")
        return self.daemon.relayer

    def _derive(self, key: str, make):
        """``make()``, once per config: a Hello or a status must not walk the whole cluster."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def members(self) -> FrozenSet[str]:
        """Every member's ID52, as far as this device knows them (all of them on the manager and relays)."""
        return self._derive("members", self._members)

    def _members(self) -> FrozenSet[str]:
        e = self.entry
        if e.cluster is not None:
            return frozenset(m.id52 for m in e.cluster.machines.values())
        return frozenset(e.machine.members.values()) if e.machine is not None else frozenset()

    def relay_open(self, caller: str, target: str):
        relayer = self.relayer()
        if target not in self.members():
            raise StreamRefused(f"{target} is not a member of {self.name}", "RELAY_REFUSED")
        link = self.daemon.pool.current(self.identity.id52, target)
        if link is None:
            raise StreamRefused(f"{self.name_of(target)} keeps no link to this relay (is its daemon running?)",
                                "RELAY_REFUSED")
        return relayer.open(link, caller, target)

    def relays(self) -> List[str]:
        """The ID52s that may relay to this machine: members with relay = true, then the manager."""
        machine = self.entry.machine
        relays = [r.id52 for r in machine.relays.values()] if machine is not None else []
        manager = self.manager_id52()
        return relays + ([manager] if manager else [])

    def relayed(self, relay: str, caller: str):
        """A relay (the manager, or a member with relay = true) carries ``caller``'s link to us:
        the protocol that accepts it (its TLS handshake, then a link like any other)."""
        if relay not in self.relays():
            raise StreamRefused("only this cluster's manager or a member with relay = true may relay to us",
                                "RELAY_REFUSED")
        self.log.info("{cluster}: a link from {caller} arrives through {relay}", cluster=self.name,
                      caller=self.name_of(caller), relay=self.name_of(relay))
        return self.daemon.accept.buildProtocol(None)

    def manager_id52(self) -> Optional[str]:
        """The cluster manager's ID52: ours on the manager, else from cluster-info.toml (the trust
        anchor a machine was set up with), else from the pushed config."""
        e = self.entry
        if e.cluster is not None:
            return e.cluster.manager.id52
        if e.info is not None:
            return e.info.manager_id52
        return e.machine.manager.id52 if e.machine is not None else None

    # -- who this cluster talks to -------------------------------------------
    def peers(self) -> FrozenSet[str]:
        """Every ID52 this cluster accepts links from."""
        return self._derive("peers", self._peers)

    def _peers(self) -> FrozenSet[str]:
        e = self.entry
        if e.role == MANAGER and e.cluster is not None:
            acl = Acl.for_cluster(e.cluster)
            ids = {m.id52 for m in e.cluster.machines.values()}
            ids.update(acl.members(e.cluster.manager.config_editors))
            return frozenset(ids)
        ids = set()
        if e.info is not None:
            ids.add(e.info.manager_id52)
        if e.machine is not None:
            m = e.machine
            ids.add(m.manager.id52)
            ids.update(m.callers.values())
            ids.update(d.id52 for d in m.directory.values())
            ids.update(r.id52 for r in m.relays.values())
            ids.update(m.members.values())  # a relay serves every member
            for expr in _expressions(m.machine):
                ids.update(expression_terms(expr))
        return frozenset(ids)

    def knows(self, peer: str) -> bool:
        return peer in self.peers()

    def admits(self, peer: str) -> bool:
        """Whether a stranger may open a link, to join with an invite: only on a manager with one pending."""
        return self.entry.cluster is not None and bool(InviteStore(self.entry.path).pending())

    def addresses(self) -> Dict[str, List[str]]:
        """Connection hints from config, by ID52."""
        e = self.entry
        out: Dict[str, List[str]] = {}
        if e.cluster is not None:
            for m in e.cluster.machines.values():
                out[m.id52] = list(m.addrs)
        if e.info is not None:
            out[e.info.manager_id52] = list(e.info.addrs)
        if e.machine is not None:
            relays = [f"relay:{r}" for r in self.relays()]  # for machines nobody can dial
            for r in e.machine.relays.values():
                out[r.id52] = list(r.addrs)
            for d in e.machine.directory.values():
                out[d.id52] = [*d.addrs, *(h for h in relays if h != f"relay:{d.id52}")]
        return out

    def resolve(self, name: str) -> Optional[str]:
        """The ID52 of a machine of this cluster by name (the manager's as ``manager``)."""
        e = self.entry
        if e.cluster is not None and name in e.cluster.machines:
            return e.cluster.machines[name].id52
        if e.machine is not None and name in e.machine.directory:
            return e.machine.directory[name].id52
        if name in ("manager", "cm"):
            return self.manager_id52()
        return None

    def target(self, peer: str) -> str:
        """The ID52 of ``peer``: an ID52 as it is, else a machine name of this cluster."""
        try:
            return parse_id52(peer)
        except ID52Error:
            pass
        id52 = self.resolve(peer)
        if id52 is None:
            known = ", ".join(self.exec_targets()) or "none"
            raise MalaiError(f"cluster {self.name} has no machine {peer!r} that this device may reach; "
                             f"machines: {known}")
        return id52

    def name_of(self, id52: str) -> str:
        """A peer's machine name in this cluster (``manager`` for the manager), else its ID52."""
        e = self.entry
        if id52 == self.manager_id52():
            return "manager"
        if e.cluster is not None:
            names = self._derive("names", lambda: {m.id52: m.name for m in e.cluster.machines.values()})
            return names.get(id52, id52)
        if e.machine is not None:
            for name, d in e.machine.directory.items():
                if d.id52 == id52:
                    return name
            for name, caller in e.machine.callers.items():
                if caller == id52:
                    return name
        return id52

    def exec_targets(self) -> List[str]:
        """Machines one may try to run commands on from here (the machine decides)."""
        e = self.entry
        if e.cluster is not None:
            return sorted(m.name for m in e.cluster.machines.values() if m.id52 != self.identity.id52)
        if e.machine is not None:
            return sorted(d.name for d in e.machine.directory.values() if d.exec or d.shell or d.commands)
        return []

    def http_services(self) -> List[Tuple[str, str]]:
        """(machine, service) pairs of the HTTP services this device may reach in this cluster."""
        e, me = self.entry, self.identity.id52
        if e.cluster is not None:
            acl = Acl.for_cluster(e.cluster)
            return sorted((m.name, s) for m in e.cluster.machines.values() if m.id52 != me
                          for s in m.http if acl.can_reach(m, "http", s, me))
        if e.machine is not None:
            return sorted((d.name, s) for d in e.machine.directory.values() for s in d.http)
        return []

    def responder_for(self, peer: PeerAddress) -> amp.CommandLocator:
        return ClusterResponder(self, peer) if self.knows(peer.peer) else JoinLocator(self, peer)

    def stream_responder(self) -> StreamResponder:
        return self._derive("streams", lambda: StreamResponder(self))

    def config_version(self) -> int:
        if self.publisher is not None:
            return self.publisher.version() or 0
        return self.entry.machine.version if self.entry.machine is not None else 0

    def heartbeat_interval(self) -> int:
        e = self.entry
        manager = e.cluster.manager if e.cluster is not None else e.machine.manager if e.machine is not None else None
        return manager.heartbeat if manager is not None else DEFAULT_HEARTBEAT

    def machine_records(self, caller: Optional[str] = None, only: Optional[str] = None) -> List[dict]:
        """On the manager: every machine (or those ``caller`` may reach), as heartbeats and pushes left them."""
        config = self.entry.cluster
        if config is None or self.health is None or self.publisher is None:
            return []
        if caller is None:
            names = [m.name for m in config.machines.values()]
        else:
            part = self.publisher.made.get(self.name_of(caller))
            names = list(part.directory) if part is not None else []
        if only is not None:
            names = [n for n in names if n == only]
        sync = {m["machine"]: m for m in self.publisher.sync_state()}
        return self.health.records([(n, config.machines[n].id52) for n in names if n in config.machines],
                                   self.heartbeat_interval(), sync)

    def summary(self) -> dict:
        e = self.entry
        machines = len(e.cluster.machines) if e.cluster is not None else 0
        sync = self.publisher.sync_state() if self.publisher is not None else []
        if self.health is not None and e.cluster is not None:  # last seen: the last heartbeat, if any came
            for m in sync:
                machine = e.cluster.machines.get(m["machine"])
                seen = self.health.last_seen(machine.id52) if machine is not None else 0.0
                m["last_seen"] = seen or m["last_seen"]
        counts = Counter(m["sync"] for m in sync)
        return {"cluster": self.name, "role": self.role, "id52": self.identity.id52, "machines": machines,
                "waiting_for_config": e.role != MANAGER and e.machine is None,
                "manager_problem": self.agent.manager_problem() if self.agent is not None else "",
                "config_version": self.config_version(),
                "publishing": self.publisher is not None and self.publisher.publishing(),
                "in_sync": counts["in sync"], "pending": counts["pending"], "failing": counts["error"],
                "sync": sync}


def _expressions(machine) -> List[str]:
    out = [x for x in (machine.allow_from, machine.allow_shell, machine.allow_files) if x]
    for entries in (machine.commands, machine.tcp, machine.http):
        out.extend(entry.allow_from for entry in entries.values() if entry.allow_from)
    return out
