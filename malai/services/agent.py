"""``MachineAgent`` (machine): keep a link to the cluster manager, accept its signed configs."""

import hashlib
from typing import Optional

from twisted.application.service import Service
from twisted.logger import Logger

from malai.atomic import write_atomic
from malai.config.envelope import Envelope
from malai.config.errors import ConfigError
from malai.config.machine import parse_machine_config
from malai.errors import MalaiError
from malai.peer.ping import ping

__all__ = ["MachineAgent"]

RETRY_FIRST, RETRY_MAX = 1.0, 30.0


class MachineAgent(Service):
    """Dials the manager (re-dialing with backoff), pings it to keep the link open, so the
    manager can push over that link even when it cannot dial this machine."""

    log = Logger()

    def __init__(self, reactor, cluster, pool, heartbeat: float = 60.0):
        self.reactor = reactor
        self.cluster = cluster
        self.pool = pool
        self.heartbeat = heartbeat
        self.link = None
        self._call = None
        self._delay = RETRY_FIRST
        self.setName("agent")

    @property
    def manager(self) -> str:
        e = self.cluster.entry
        return e.info.manager_id52 if e.info is not None else e.machine.manager.id52

    def startService(self) -> None:
        super().startService()
        self._schedule(0)

    def stopService(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return super().stopService()

    def _schedule(self, delay: float) -> None:
        if self.running and (self._call is None or not self._call.active()):
            self._call = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        """Make sure a link to the manager is up; ping over it as a heartbeat."""
        self._call = None
        d = self.pool.get(self.cluster.identity, self.manager)
        d.addCallback(self._linked)
        d.addCallbacks(self._alive, self._down)

    def _linked(self, link):
        if link is not self.link:
            self.link = link
            self.log.info("{cluster}: linked to the manager via {hint}", cluster=self.cluster.name,
                          hint=link.peer.hint or "its link")
            link.closed.addCallback(lambda _: self._lost(link))
        return ping(link)

    def _alive(self, _) -> None:
        self._delay = RETRY_FIRST
        self._schedule(self.heartbeat)

    def _down(self, failure) -> None:
        self.log.info("{cluster}: manager unreachable ({reason}); retrying in {delay:g}s",
                      cluster=self.cluster.name, reason=failure.getErrorMessage(), delay=self._delay)
        self._schedule(self._delay)
        self._delay = min(self._delay * 2, RETRY_MAX)

    def _lost(self, link) -> None:
        if link is self.link:
            self.link = None
            if self._call is not None and self._call.active():
                self._call.cancel()
                self._call = None
            self._schedule(self._delay)

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
