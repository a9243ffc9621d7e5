"""``ConfigPublisher`` (cluster manager): push each machine its signed config until it acks.

Built to stay responsive with thousands of machines (docs/config-distribution.md, "At scale"):
one ``Personalizer`` makes every machine's part per rescan, a slice of the reactor's time at a
time (``Cooperator``); only machines whose part changed are rendered, signed and queued; at
most ``IN_FLIGHT`` pushes are on the wire, the next one leaving as an answer arrives; failed
pushes are retried with jittered backoff; the per-machine state lives in memory and reaches
``state.json`` at most once per ``SAVE_EVERY`` seconds.
"""

import random
import time
from collections import OrderedDict
from typing import Dict, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Cooperator, TaskStopped
from twisted.logger import Logger
from twisted.python.failure import Failure

from malai.config.envelope import Envelope
from malai.config.machine import Personalizer, render_machine_config
from malai.config.models import MachineConfig
from malai.config.store import ClusterStore, sha256_hex
from malai.errors import MalaiError
from malai.peer.commands import PushConfig

__all__ = ["ConfigPublisher", "laggards"]

RETRY_FIRST, RETRY_MAX = 1.0, 60.0
IN_FLIGHT = 64  # pushes waiting for their answer at once
SAVE_EVERY = 1.0  # seconds between two writes of state.json, at least
SAVE_SHARE = 0.05  # of the reactor's time writing state.json may take at most


class ConfigPublisher(Service):
    """Keeps, per machine, the version and hash it acked, when, last seen and last error
    (in memory, and in ``state.json`` within ``SAVE_EVERY`` seconds)."""

    log = Logger()

    def __init__(self, reactor, cluster, pool, store: ClusterStore):
        self.reactor = reactor
        self.cluster = cluster
        self.pool = pool
        self.store = store
        self.machines: Optional[Dict[str, dict]] = None  # state.json's "machines", ours once loaded
        self.published: Optional[int] = None  # the version of the last publish
        self.made: Dict[str, MachineConfig] = {}  # each machine's part (at version 0) as last published
        self.by_id52: Dict[str, str] = {}
        self.pending: Dict[str, Envelope] = {}  # machine name -> envelope to deliver
        self.queue: "OrderedDict[str, None]" = OrderedDict()  # names waiting for a slot, first out first
        self.in_flight: set = set()
        self.retry: Dict[str, IDelayedCall] = {}  # machine name -> pending retry
        self.backoff: Dict[str, float] = {}
        self.cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self._making = None  # the publish in progress
        self._pumping = False
        self._save_call: Optional[IDelayedCall] = None
        self._saved_at = float("-inf")
        self._save_every = SAVE_EVERY  # longer when a write takes long (10,000 machines: 4 MB)
        self._store_part: dict = {}  # state.json but "machines", as last read
        self._written: Optional[tuple] = None  # state.json's (mtime, size) after our last write
        self.setName("publisher")

    def startService(self) -> None:
        super().startService()
        self.publish()

    def stopService(self):
        self._stop_making()
        for call in self.retry.values():
            if call.active():
                call.cancel()
        self.retry.clear()
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()
            self._save()
        return super().stopService()

    # -- what each machine should have ----------------------------------------
    def publish(self) -> None:
        """Make every machine's config from the current ``cluster.toml``, cooperatively (a
        publish still in progress gives way to this one); queue each whose content changed."""
        config = self.cluster.entry.cluster
        try:
            rev = self.store.current()
            if self.machines is None:
                self.machines = self.store.load_state().get("machines", {})
        except MalaiError as e:  # cluster.toml changed since the rescan that loaded it; the next one says more
            self.log.error("{cluster}: nothing published: {error}", cluster=self.cluster.name, error=e)
            return
        self.published = rev.version
        for name in set(self.machines) - set(config.machines):
            del self.machines[name]
            self.made.pop(name, None)
            self.pending.pop(name, None)
            self.queue.pop(name, None)
            self._cancel_retry(name)
        self.by_id52 = {m.id52: name for name, m in config.machines.items()}
        self._stop_making()
        self._making = making = self.cooperator.cooperate(self._make(config, rev.version))
        making.whenDone().addBoth(self._made, making)

    def _make(self, config, version: int):
        """One step per machine: its part, then (if it changed) its envelope, queued."""
        personalizer, rendered = Personalizer(config), {}  # parts machines share are rendered once
        yield from personalizer.walk()
        for name, machine in config.machines.items():
            yield None
            st = self.machines.setdefault(name, {"name": name})
            if st.get("id52") != machine.id52:
                st.clear()
                st.update(name=name, id52=machine.id52)
                self.made.pop(name, None)
            part = personalizer.machine(name)
            if self.made.get(name) != part or "content" not in st:
                content = sha256_hex(render_machine_config(part, rendered))
                self.made[name] = part
            else:
                content = st["content"]
            if st.get("content") == content and "pending_version" not in st:
                self.pending.pop(name, None)
                continue
            body = render_machine_config(attrs.evolve(part, version=version), rendered)
            self.pending[name] = Envelope.seal(self.cluster.identity, machine.id52, version, body)
            st.update(content=content, pending_version=version)
            self._changed()
            self._enqueue(name)

    def _stop_making(self) -> None:
        if self._making is not None:
            self._making.stop()

    def _made(self, result, making) -> None:
        if self._making is making:
            self._making = None
        if isinstance(result, Failure) and not result.check(TaskStopped):
            self.log.failure("{cluster}: publishing failed", result, cluster=self.cluster.name)

    def peer_connected(self, id52: str, hints) -> None:
        """A machine opened a link: note it and where it listens, and deliver now what waits for it."""
        name = self.by_id52.get(id52)
        if name is None or self.machines is None or name not in self.machines:
            return
        self._set(name, last_seen=time.time(), addrs=list(hints))
        if name in self.pending:
            self.backoff.pop(name, None)
            self._cancel_retry(name)
            self._enqueue(name, first=True)

    # -- delivery ---------------------------------------------------------------
    def _enqueue(self, name: str, first: bool = False) -> None:
        self._cancel_retry(name)
        self.queue[name] = None
        if first:
            self.queue.move_to_end(name, last=False)
        self._pump()

    def _pump(self) -> None:
        """Start queued pushes while fewer than ``IN_FLIGHT`` wait for an answer."""
        if self._pumping:  # a push that failed at once ends inside the loop below
            return
        self._pumping = True
        try:
            while self.queue and len(self.in_flight) < IN_FLIGHT and self.running:
                name, _ = self.queue.popitem(last=False)
                if name in self.pending and name not in self.in_flight:
                    self._push(name)
        finally:
            self._pumping = False

    def _push(self, name: str) -> None:
        envelope = self.pending[name]
        self.in_flight.add(name)
        d = self.pool.get(self.cluster.identity, envelope.machine)
        d.addCallback(lambda link: link.callRemote(
            PushConfig, cluster=envelope.cluster, machine=envelope.machine, version=envelope.version,
            sha256=envelope.sha256, body=envelope.body, signature=envelope.signature))
        d.addBoth(self._answered, name, envelope, self.reactor.seconds())

    def _answered(self, answer, name: str, envelope: Envelope, sent: float) -> None:
        self.in_flight.discard(name)
        metrics = getattr(self.cluster.daemon, "metrics", None)
        if metrics is not None:
            metrics.pushed(self.cluster.name, not isinstance(answer, Failure), self.reactor.seconds() - sent)
        if isinstance(answer, Failure):
            self._failed(answer.getErrorMessage(), name, envelope)
        elif answer["sha256"] != envelope.sha256:
            self._failed(f"acked hash {answer['sha256']} is not the pushed {envelope.sha256}", name, envelope)
        else:
            self._acked(name, envelope)
        self._pump()

    def _acked(self, name: str, envelope: Envelope) -> None:
        now = time.time()
        self._set(name, version=envelope.version, sha256=envelope.sha256, acked_at=now, last_seen=now,
                  last_error=None)
        self.log.info("{cluster}: {machine} has version {version}", cluster=self.cluster.name, machine=name,
                      version=envelope.version)
        if self.pending.get(name) is envelope:
            del self.pending[name]
            self.backoff.pop(name, None)
            if self.machines.get(name, {}).get("pending_version") == envelope.version:
                self._set(name, pending_version=None)
        elif name in self.pending:
            self._enqueue(name)  # a newer one was queued meanwhile

    def _failed(self, reason: str, name: str, envelope: Envelope) -> None:
        if self.machines.get(name, {}).get("last_error") != reason:  # each new reason once, not every retry
            self.log.warn("{cluster}: push of version {version} to {machine} failed: {reason}",
                          cluster=self.cluster.name, version=envelope.version, machine=name, reason=reason)
        self._set(name, last_error=reason)
        if name in self.pending and self.running:
            delay = self.backoff.get(name, RETRY_FIRST)
            self.backoff[name] = min(delay * 2, RETRY_MAX)
            self._cancel_retry(name)
            self.retry[name] = self.reactor.callLater(delay * random.uniform(0.5, 1.5), self._retry, name)

    def _retry(self, name: str) -> None:
        self.retry.pop(name, None)
        if name in self.pending:
            self._enqueue(name)

    def _cancel_retry(self, name: str) -> None:
        call = self.retry.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    # -- state.json -------------------------------------------------------------
    def _set(self, name: str, **changes) -> None:
        st = self.machines.get(name) if self.machines is not None else None
        if st is None:
            return
        before = dict(st)
        for key, value in changes.items():
            if value is None:
                st.pop(key, None)
            else:
                st[key] = value
        if st != before:  # a retry failing as the last one did writes nothing
            self._changed()

    def _changed(self) -> None:
        """Write state.json soon: at once after a quiet spell, else a while after the last write
        (``SAVE_EVERY``, or longer so that writing takes at most ``SAVE_SHARE`` of the time)."""
        if self._save_call is None or not self._save_call.active():
            delay = max(0.0, self._saved_at + self._save_every - self.reactor.seconds())
            self._save_call = self.reactor.callLater(delay, self._save)

    def _save(self) -> None:
        self._saved_at = self.reactor.seconds()
        started = time.monotonic()
        self._write()
        self._save_every = max(SAVE_EVERY, (time.monotonic() - started) / SAVE_SHARE)

    def _write(self) -> None:
        if _stat(self.store.state_file) != self._written:  # the store wrote its part (version, hash) since
            try:
                self._store_part = {k: v for k, v in self.store.load_state().items() if k != "machines"}
            except MalaiError as e:
                self.log.error("{cluster}: state.json not written: {error}", cluster=self.cluster.name, error=e)
                return
        self.store.save_state({**self._store_part, "machines": self.machines})
        self._written = _stat(self.store.state_file)

    def sync_state(self) -> list:
        """Per machine: version, in sync / pending / error, last seen."""
        out = []
        for name, st in sorted((self.machines or {}).items()):
            if name in self.pending or st.get("pending_version") is not None:
                sync = "error" if st.get("last_error") else "pending"
            else:
                sync = "in sync"
            out.append({"machine": name, "version": st.get("version", 0), "sync": sync,
                        "last_seen": st.get("last_seen", 0.0), "error": st.get("last_error") or ""})
        return out

    def publishing(self) -> bool:
        """Whether the configs of the last rescan are still being made (machines not reached
        yet still count as in sync)."""
        return self._making is not None

    def version(self) -> int:
        """The version last published (before any: the one state.json names)."""
        if self.published is None:
            try:
                return int(self.store.load_state().get("version", 0))
            except MalaiError:
                return 0
        return self.published


def _stat(path) -> Optional[tuple]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def laggards(sync: list, most: int) -> list:
    """A small cluster's machines all; of a bigger one the ``most`` furthest behind: failing
    first, then pending, each those unseen longest first."""
    if len(sync) <= most:
        return sync
    behind = [m for m in sync if m["sync"] != "in sync"]
    return sorted(behind, key=lambda m: (m["sync"] != "error", m["last_seen"], m["machine"]))[:most]
