"""``MachineAgent`` (machine): keep a link to the cluster manager, accept its signed configs."""

import hashlib
from typing import Dict, Optional

from twisted.application.service import Service
from twisted.logger import Logger

from malai.atomic import write_atomic
from malai.config.envelope import Envelope
from malai.config.errors import ConfigError
from malai.config.machine import parse_machine_config
from malai.errors import MalaiError
from malai.services.keeper import LinkKeeper

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
                self.keepers[peer] = LinkKeeper(self.reactor, self.cluster, self.pool, peer, label, self.heartbeat)
                self.keepers[peer].start()

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
