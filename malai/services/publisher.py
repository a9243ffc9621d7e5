"""``ConfigPublisher`` (cluster manager): push each machine its signed config until it acks."""

import time
from typing import Dict, List, Optional

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from malai.config.envelope import Envelope
from malai.config.machine import personalize, render_machine_config
from malai.config.store import ClusterStore, sha256_hex
from malai.errors import MalaiError
from malai.peer.commands import PushConfig

__all__ = ["ConfigPublisher"]

RETRY_FIRST, RETRY_MAX = 1.0, 60.0


class ConfigPublisher(Service):
    """Keeps ``state.json``: per machine the version and hash it acked, when, last seen, last error."""

    log = Logger()

    def __init__(self, reactor, cluster, pool, store: ClusterStore):
        self.reactor = reactor
        self.cluster = cluster
        self.pool = pool
        self.store = store
        self.pending: Dict[str, Envelope] = {}  # machine name -> envelope to deliver
        self.in_flight: set = set()
        self.retry: Dict[str, IDelayedCall] = {}  # machine name -> pending retry
        self.backoff: Dict[str, float] = {}
        self.setName("publisher")

    def startService(self) -> None:
        super().startService()
        self.publish()

    def stopService(self):
        for call in self.retry.values():
            if call.active():
                call.cancel()
        self.retry.clear()
        return super().stopService()

    # -- what each machine should have ----------------------------------------
    def publish(self) -> None:
        """Compute every machine's config; queue those whose content changed."""
        config = self.cluster.entry.cluster
        try:
            rev = self.store.current()
        except MalaiError as e:  # cluster.toml changed since the rescan that loaded it; the next one says more
            self.log.error("{cluster}: nothing published: {error}", cluster=self.cluster.name, error=e)
            return
        state = self.store.load_state()
        machines = state.setdefault("machines", {})
        for name in set(machines) - set(config.machines):
            del machines[name]
            self.pending.pop(name, None)
        for name, machine in config.machines.items():
            content = sha256_hex(render_machine_config(personalize(config, name, 0)))
            st = machines.setdefault(name, {"name": name})
            if st.get("id52") != machine.id52:
                st.clear()
                st.update(name=name, id52=machine.id52)
            if st.get("content") == content and "pending_version" not in st:
                self.pending.pop(name, None)
                continue
            body = render_machine_config(personalize(config, name, rev.version))
            self.pending[name] = Envelope.seal(self.cluster.identity, machine.id52, rev.version, body)
            st.update(content=content, pending_version=rev.version)
        self.store.save_state(state)
        for name in list(self.pending):
            self._push(name)

    def peer_connected(self, id52: str, hints: List[str]) -> None:
        """A machine opened a link: note it and where it listens, and deliver now what waits for it."""
        for name, st in self._states().items():
            if st.get("id52") == id52:
                self._update(name, last_seen=time.time(), addrs=hints)
                if name in self.pending:
                    self._cancel_retry(name)
                    self._push(name)

    # -- delivery ---------------------------------------------------------------
    def _push(self, name: str) -> None:
        if name in self.in_flight or not self.running:
            return
        envelope = self.pending[name]
        self.in_flight.add(name)
        d = self.pool.get(self.cluster.identity, envelope.machine)
        d.addCallback(lambda link: link.callRemote(
            PushConfig, cluster=envelope.cluster, machine=envelope.machine, version=envelope.version,
            sha256=envelope.sha256, body=envelope.body, signature=envelope.signature))
        d.addCallbacks(self._acked, self._failed, callbackArgs=(name, envelope), errbackArgs=(name, envelope))
        d.addBoth(lambda _: self.in_flight.discard(name))

    def _acked(self, answer: dict, name: str, envelope: Envelope) -> None:
        if answer["sha256"] != envelope.sha256:
            raise ValueError(f"acked hash {answer['sha256']} is not the pushed {envelope.sha256}")
        now = time.time()
        st = self._update(name, version=envelope.version, sha256=envelope.sha256, acked_at=now, last_seen=now,
                          last_error=None)
        self.log.info("{cluster}: {machine} has version {version}", cluster=self.cluster.name, machine=name,
                      version=envelope.version)
        if self.pending.get(name) is envelope:
            del self.pending[name]
            self.backoff.pop(name, None)
            if st.get("pending_version") == envelope.version:
                self._update(name, pending_version=None)
        elif name in self.pending:
            self._push(name)  # a newer one was queued meanwhile

    def _failed(self, failure, name: str, envelope: Envelope) -> None:
        reason = failure.getErrorMessage()
        self._update(name, last_error=reason)
        self.log.warn("{cluster}: push of version {version} to {machine} failed: {reason}",
                      cluster=self.cluster.name, version=envelope.version, machine=name, reason=reason)
        if name in self.pending and self.running:
            delay = self.backoff.get(name, RETRY_FIRST)
            self.backoff[name] = min(delay * 2, RETRY_MAX)
            self._cancel_retry(name)
            self.retry[name] = self.reactor.callLater(delay, self._retry, name)

    def _retry(self, name: str) -> None:
        self.retry.pop(name, None)
        if name in self.pending:
            self._push(name)

    def _cancel_retry(self, name: str) -> None:
        call = self.retry.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    # -- state.json -------------------------------------------------------------
    def _states(self) -> dict:
        return self.store.load_state().get("machines", {})

    def _update(self, name: str, **changes) -> dict:
        state = self.store.load_state()
        st = state.setdefault("machines", {}).get(name)
        if st is None:
            return {}
        for key, value in changes.items():
            if value is None:
                st.pop(key, None)
            else:
                st[key] = value
        self.store.save_state(state)
        return st

    def sync_state(self) -> list:
        """Per machine: version, in sync / pending / error, last seen."""
        out = []
        for name, st in sorted(self._states().items()):
            if name in self.pending or st.get("pending_version") is not None:
                sync = "error" if st.get("last_error") else "pending"
            else:
                sync = "in sync"
            out.append({"machine": name, "version": st.get("version", 0), "sync": sync,
                        "last_seen": st.get("last_seen", 0.0), "error": st.get("last_error") or ""})
        return out

    def version(self) -> Optional[int]:
        return int(self.store.load_state().get("version", 0))
