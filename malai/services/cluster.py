"""``ClusterService``: one cluster this device belongs to, as manager or machine."""

from typing import Dict, FrozenSet, List, Optional

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.protocols import amp

from malai.acl import Acl, expression_terms
from malai.home import MANAGER, ClusterEntry
from malai.identity import Identity
from malai.p2p.link import PeerAddress

__all__ = ["ClusterService"]


class ClusterResponder(amp.CommandLocator):
    """Commands a verified peer may send to this cluster (features add responders here)."""

    def __init__(self, cluster: "ClusterService", peer: PeerAddress):
        self.cluster = cluster
        self.peer = peer


class ClusterService(MultiService):
    """Holds a cluster's identity and config, decides which peers it talks to."""

    log = Logger()

    def __init__(self, entry: ClusterEntry):
        super().__init__()
        self.setName(entry.alias)
        self.entry = entry

    @property
    def identity(self) -> Identity:
        assert self.entry.identity is not None
        return self.entry.identity

    @property
    def role(self) -> str:
        assert self.entry.role is not None
        return self.entry.role

    def reconfigure(self, entry: ClusterEntry) -> None:
        """Take a new valid config for the same identity, in place."""
        self.entry = entry
        self.log.info("{cluster} reloaded", cluster=self.name)

    # -- who this cluster talks to -------------------------------------------
    def peers(self) -> FrozenSet[str]:
        """Every ID52 this cluster accepts links from."""
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
            for expr in _expressions(m.machine):
                ids.update(expression_terms(expr))
        return frozenset(ids)

    def knows(self, peer: str) -> bool:
        return peer in self.peers()

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
            for d in e.machine.directory.values():
                out[d.id52] = list(d.addrs)
        return out

    def resolve(self, name: str) -> Optional[str]:
        """The ID52 of a machine of this cluster by name (the manager's as ``manager``)."""
        e = self.entry
        if e.cluster is not None and name in e.cluster.machines:
            return e.cluster.machines[name].id52
        if e.machine is not None and name in e.machine.directory:
            return e.machine.directory[name].id52
        if name in ("manager", "cm"):
            if e.cluster is not None:
                return e.cluster.manager.id52
            if e.info is not None:
                return e.info.manager_id52
        return None

    def responder_for(self, peer: PeerAddress) -> amp.CommandLocator:
        return ClusterResponder(self, peer)

    def summary(self) -> dict:
        e = self.entry
        machines = len(e.cluster.machines) if e.cluster is not None else 0
        return {"cluster": self.name, "role": self.role, "id52": self.identity.id52, "machines": machines,
                "waiting_for_config": e.role != MANAGER and e.machine is None}


def _expressions(machine) -> List[str]:
    out = [x for x in (machine.allow_from, machine.allow_shell) if x]
    for entries in (machine.commands, machine.tcp, machine.http):
        out.extend(entry.allow_from for entry in entries.values() if entry.allow_from)
    return out
