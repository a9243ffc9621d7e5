"""Heartbeats on the manager: a machine of the cluster reports about itself, a member lists the
machines it may reach. Every field a peer fills is bounded (``problem``) before it is kept."""

import math
from typing import Optional

from twisted.logger import Logger
from twisted.protocols import amp

from malai.peer.commands import Heartbeat, ListMachines, NotAllowed

__all__ = ["BOUNDS", "HeartbeatLocator", "problem"]

#: The longest text, the most list items, the largest number a heartbeat may carry.
TEXT_MAX, ITEMS_MAX, INTEGER_MAX, NUMBER_MAX = 256, 16, 2**62, 1e12
BOUNDS = (TEXT_MAX, ITEMS_MAX, INTEGER_MAX, NUMBER_MAX)


def problem(fields: dict) -> Optional[str]:
    """What is wrong with a heartbeat's fields, if anything."""
    for key, value in fields.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > ITEMS_MAX:
            return f"{key} has {len(value)} items, more than {ITEMS_MAX}"
        for v in values:
            if isinstance(v, str) and len(v) > TEXT_MAX:
                return f"{key} is longer than {TEXT_MAX} characters"
            if isinstance(v, bool):
                continue
            if isinstance(v, int) and not 0 <= v <= INTEGER_MAX:
                return f"{key} is out of range (0 to {INTEGER_MAX})"
            if isinstance(v, float) and not (math.isfinite(v) and 0 <= v <= NUMBER_MAX):
                return f"{key} is out of range (0 to {NUMBER_MAX:g})"
    return None


class HeartbeatLocator(amp.CommandLocator):
    """The heartbeat commands of ``ClusterResponder`` (which gives ``cluster`` and ``peer``)."""

    log = Logger()

    def _health(self, action: str):
        health = self.cluster.health
        if health is None:
            raise NotAllowed(f"{action}: this device does not manage {self.cluster.name}; ask its manager")
        if self.peer.peer not in self.cluster.members():
            self.log.warn("{cluster}: refused {action} from {peer}: not a machine of the cluster",
                          cluster=self.cluster.name, action=action, peer=self.peer.peer)
            raise NotAllowed(f"{action}: only machines of {self.cluster.name} may do this")
        return health

    @Heartbeat.responder
    def heartbeat(self, **fields):
        health = self._health("heartbeat")
        wrong = problem(fields)
        if wrong:
            self.log.warn("{cluster}: refused a heartbeat from {peer}: {why}", cluster=self.cluster.name,
                          peer=self.peer.peer, why=wrong)
            raise NotAllowed(f"heartbeat refused: {wrong}")
        health.record(self.peer.peer, fields)  # about the verified peer, whatever it claims
        self.log.debug("{cluster}: heartbeat from {machine}", cluster=self.cluster.name,
                       machine=self.cluster.name_of(self.peer.peer))
        return {}

    @ListMachines.responder
    def list_machines(self, machine: Optional[str] = None):
        self._health("machine listing")
        return {"machines": self.cluster.machine_records(caller=self.peer.peer, only=machine)}
