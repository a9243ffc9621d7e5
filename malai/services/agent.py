"""``MachineAgent`` (machine): keep a link to the cluster manager, report to it in heartbeats,
accept its signed configs."""

import hashlib
from typing import Dict, List, Optional

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.protocols import amp

from malai.atomic import write_atomic
from malai.config.envelope import Envelope
from malai.config.errors import ConfigError
from malai.config.machine import parse_machine_config
from malai.errors import MalaiError
from malai.inventory import inventory
from malai.peer.commands import Heartbeat, NotAllowed
from malai.peer.ping import ping
from malai.services.keeper import LinkKeeper
from malai.services.tor import tor_hint

__all__ = ["MachineAgent"]

class MachineAgent(Service):
    """Keeps a link to the manager (and to every member with ``relay = true``), so they
    can push configs and relay callers over it even when nobody can dial this machine."""

    log = Logger()

    def __init__(self, reactor, cluster, pool, heartbeat: float = 60.0):
        self.reactor = reactor
        self.cluster = cluster
        self.pool = pool
        self.heartbeat = heartbeat
        self.keepers: Dict[str, LinkKeeper] = {}
        self.setName("agent")

    @property
    def manager(self) -> str:
        return self.cluster.manager_id52()

    def manager_problem(self) -> str:
        """Why there is no link to the manager now, in words for ``malai status`` ("" when linked)."""
        keeper = self.keepers.get(self.manager)
        problem = keeper.problem if keeper is not None and keeper.link is None else ""
        if problem.startswith("no known address"):
            return ("no address for the manager: none in cluster-info.toml, none learnt, none announced on the "
                    f"LAN; run `malai machine init {self.manager} {self.cluster.name} --addr HOST:PORT` again, "
                    "or set up [tor]")
        return problem

    @property
    def link(self):
        keeper = self.keepers.get(self.manager)
        return keeper.link if keeper is not None else None

    def startService(self) -> None:
        super().startService()
        self.sync()

    def stopService(self):
        for keeper in self.keepers.values():
            keeper.stop()
        self.keepers.clear()
        return super().stopService()

    def sync(self) -> None:
        """Keep links to the manager and the relays the config names now."""
        if not self.running:
            return
        machine = self.cluster.entry.machine
        wanted = {self.manager: "the manager"}
        if machine is not None:
            wanted.update({r.id52: f"relay {name}" for name, r in machine.relays.items()})
        for peer in set(self.keepers) - set(wanted):
            self.keepers.pop(peer).stop()
        for peer, label in wanted.items():
            if peer not in self.keepers:
                manager = peer == self.manager
                self.keepers[peer] = LinkKeeper(self.reactor, self.cluster, self.pool, peer, label, self.heartbeat,
                                                self._beat if manager else None)
                self.keepers[peer].start()
        keeper = self.keepers[self.manager]
        keeper.heartbeat = self.cluster.heartbeat_interval()
        keeper.hurry()  # the config may have changed: report at once

    # -- heartbeats -----------------------------------------------------------------
    _refused: Optional[str] = None  # why the manager refused our last heartbeat

    def _beat(self, link):
        """Tell the manager we are alive, what we run on and how we reach it."""
        keeper = self.keepers.get(self.manager)
        fields = {**inventory(self.cluster.entry.path), "paths": self.paths(), "config_version": self.current_version(),
                  "link": link.peer.hint or "inbound", "rtt": keeper.rtt if keeper is not None else None}
        d = link.callRemote(Heartbeat, **fields)
        d.addCallback(self._heard)
        d.addErrback(self._not_heard, link)
        return d

    def _heard(self, _) -> None:
        self.log.debug("{cluster}: heartbeat to the manager answered", cluster=self.cluster.name)
        if self._refused is not None:
            self.log.info("{cluster}: the manager takes our heartbeats again", cluster=self.cluster.name)
            self._refused = None

    def _not_heard(self, failure, link):
        """An older manager, or one that refuses us: the link is still up if it answers a ping."""
        failure.trap(NotAllowed, amp.UnhandledCommand)
        reason = failure.getErrorMessage()
        if reason != self._refused:
            self.log.warn("{cluster}: the manager refused our heartbeat: {reason}", cluster=self.cluster.name,
                          reason=reason)
            self._refused = reason
        return ping(link)

    def paths(self) -> List[str]:
        """Hints that reach this machine: where it listens, its relays, its onion service."""
        daemon = self.cluster.daemon
        hints = [f"tcp:{addr}" for addr in daemon.hello.addrs]
        hints += [f"relay:{relay}" for relay in self.cluster.relays()]
        if daemon.tor is not None and daemon.tor.onions.get(self.cluster.identity.id52) is not None:
            hints.append(tor_hint(self.cluster.identity.id52))
        return hints

    # -- receiving ----------------------------------------------------------------
    def current_version(self) -> int:
        machine = self.cluster.entry.machine
        return machine.version if machine is not None else 0

    def accept_push(self, envelope: Envelope, peer: str) -> str:
        """Check, write ``machine.toml`` atomically and apply; return the hash to ack."""
        if peer != self.manager:
            raise MalaiError(f"config pushes are accepted only from the cluster manager {self.manager}, not {peer}")
        problem = envelope.problem(self.manager, self.cluster.identity.id52)
        if problem:
            raise MalaiError(problem)
        current = self.current_version()
        path = self.cluster.entry.path / "machine.toml"
        if envelope.version == current and _file_sha256(path) == envelope.sha256:
            return envelope.sha256  # applied already; the ack was lost (a restart, say)
        if envelope.version <= current:
            raise MalaiError(f"version {envelope.version} is not newer than this machine's version {current}")
        try:
            config = parse_machine_config(envelope.body, f"pushed {path.name}")
        except ConfigError as e:
            raise MalaiError(f"the pushed config does not parse: {e}") from None
        mismatch = _body_mismatch(config, envelope, self.manager)
        if mismatch:
            raise MalaiError(mismatch)
        write_atomic(path, envelope.body.encode(), mode=0o600)
        self.log.info("{cluster}: config version {version} from the manager", cluster=self.cluster.name,
                      version=envelope.version)
        self.cluster.config_changed()
        return envelope.sha256


def _file_sha256(path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _body_mismatch(config, envelope: Envelope, manager: str) -> Optional[str]:
    if config.version != envelope.version:
        return f"the body says version {config.version}, the envelope {envelope.version}"
    if config.machine.id52 != envelope.machine:
        return f"the body is for {config.machine.id52}, not for this machine"
    if config.manager.id52 != manager:
        return f"the body names manager {config.manager.id52}, not {manager}"
    return None
