"""Relaying: reaching a machine that nobody can dial, through a member it keeps a link to.

The caller opens a ``relay`` stream, naming the target, on its link to the relay
(the cluster manager or a member with ``relay = true``). The relay opens a
``relayed`` stream on the link the target keeps to it and splices the two.
Then the caller runs its own pinned TLS handshake with the target inside the
splice, and a multiplexed link of their own inside that: the relay carries
ciphertext it cannot read and cannot impersonate either end. One such relayed
link serves every stream between caller and target.

``relay_endpoint`` makes ``relay:<id52>`` hints dialable (a plug-in of
``Dialer.kinds``); ``Relayer`` is the relay's side.
"""

from typing import Callable, Optional, Set

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks
from twisted.internet.defer import TimeoutError as NoAnswer
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from malai.identity import Identity
from malai.p2p.dial import DialError
from malai.peer.mux import MuxLink, StreamEndpoint
from malai.peer.splice import Splice, splice_pair
from malai.peer.streams import StreamRefused

__all__ = ["MAX_PER_CALLER", "MAX_STREAMS", "Relayer", "relay_endpoint"]

MAX_STREAMS = 256  # relayed links at once, in all
MAX_PER_CALLER = 32  # of one caller (a member), waiting or spliced
MAX_PENDING_PER_CALLER = 8  # of one caller, waiting for their target to take the stream
ATTACH_TIMEOUT = 10.0  # for the target to take the stream
HANDSHAKE_TIMEOUT = 10.0  # after the splice, for both ends to have sent something (the inner TLS handshake)
IDLE_TIMEOUT = 3600.0  # a relayed link that carries nothing for this long is cut
log = Logger()


@implementer(IStreamClientEndpoint)
@attrs.frozen
class _RelayEndpoint:
    """A ``relay`` stream to ``target`` on the link to ``relay``: ``connect`` runs the
    caller's protocol (its TLS link to the target) inside it."""

    links: Callable[[Identity, str], Deferred]  # the ready link to a relay, from the pool
    local: Identity
    relay: str
    target: str

    @inlineCallbacks
    def connect(self, factory: Factory):
        link = yield self.links(self.local, self.relay)
        try:
            protocol = yield StreamEndpoint(link, "relay", self.target).connect(factory)
        except StreamRefused as e:
            raise DialError(f"relay {self.relay} refused: {e}") from None
        return protocol


def relay_endpoint(links: Callable[[Identity, str], Deferred]):
    """The ``relay`` kind for ``Dialer.kinds``; ``links(local, relay)`` fires with a ready link
    to the relay (``LinkPool.get`` with the relay's direct hints)."""

    def endpoint(local: Identity, peer: str, hint: str) -> IStreamClientEndpoint:
        relay = hint.split(":", 1)[1]
        if relay == peer or relay == local.id52:
            raise DialError(f"{hint} cannot relay to itself")
        return _RelayEndpoint(links, local, relay, peer)

    return endpoint


@attrs.define(eq=False)
class _Relayed:
    """One relayed link: the caller's end of the splice and the target's."""

    caller: str
    target: str
    caller_end: Splice
    target_end: Splice
    timer: Optional[IDelayedCall] = None
    seen: int = 0  # bytes carried at the last idle check

    def carried(self) -> int:
        return self.caller_end.carried + self.target_end.carried

    def stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class Relayer:
    """The relay's side: splices a caller's ``relay`` stream onto a ``relayed`` stream on
    the link its target keeps here.

    Bounded: ``limit`` relayed links in all; per caller ``per_caller``, of which
    ``pending_per_caller`` may wait for their target. A target takes the stream
    within ``ATTACH_TIMEOUT``; both ends then send something (the inner TLS
    handshake) within ``HANDSHAKE_TIMEOUT``; a relayed link that carries no byte
    for ``IDLE_TIMEOUT`` is cut.
    """

    def __init__(self, reactor, limit: int = MAX_STREAMS, per_caller: int = MAX_PER_CALLER,
                 pending_per_caller: int = MAX_PENDING_PER_CALLER):
        self.reactor = reactor
        self.limit, self.per_caller, self.pending_per_caller = limit, per_caller, pending_per_caller
        self._pending: Set[_Relayed] = set()
        self._active: Set[_Relayed] = set()
        self.total = 0
        self._bytes_ended = 0  # carried by relayed links that ended

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def bytes(self) -> int:
        """Bytes carried, both ways, by every relayed link so far (open ones too: one may last for days)."""
        return self._bytes_ended + sum(relayed.carried() for relayed in self._active)

    def open(self, link_to_target: MuxLink, caller: str, target: str) -> Deferred:
        """Fire with the caller's end of a splice once ``target`` took its stream
        (fail with ``StreamRefused`` else)."""
        try:
            self._check_quota(caller)
        except StreamRefused as e:
            return fail(e)
        caller_end, target_end, _ = splice_pair()
        relayed = _Relayed(caller, target, caller_end, target_end)
        self._pending.add(relayed)
        log.info("relaying {caller} → {target}", caller=caller, target=target)
        taken = link_to_target.open("relayed", caller, target_end)
        taken.addTimeout(ATTACH_TIMEOUT, self.reactor)
        taken.addCallbacks(self._taken, self._not_taken, callbackArgs=(relayed,), errbackArgs=(relayed,))
        return taken

    def _taken(self, _, relayed: _Relayed) -> Splice:
        self._pending.discard(relayed)
        self._active.add(relayed)
        self.total += 1
        relayed.timer = self.reactor.callLater(HANDSHAKE_TIMEOUT, self._handshake_due, relayed)
        relayed.caller_end.on_close = relayed.target_end.on_close = lambda _: self._ended(relayed)
        return relayed.caller_end

    def _not_taken(self, failure, relayed: _Relayed):
        self._pending.discard(relayed)
        if failure.check(StreamRefused):
            why = failure.value.reason
        elif failure.check(NoAnswer):
            why = f"no answer within {ATTACH_TIMEOUT:g}s"
        elif failure.check(CancelledError):
            why = "the caller gave up"
        else:
            why = failure.getErrorMessage() or "no answer"
        raise StreamRefused(f"{relayed.target} did not take the relayed link: {why}", "RELAY_REFUSED")

    def _check_quota(self, caller: str) -> None:
        if len(self._active) + len(self._pending) >= self.limit:
            raise StreamRefused(f"this relay carries {self.limit} links at most; try again later", "RELAY_REFUSED")
        pending = sum(1 for s in self._pending if s.caller == caller)
        if pending >= self.pending_per_caller:
            raise StreamRefused(f"{pending} of your relayed links wait for their target already; try again later",
                                "RELAY_REFUSED")
        if pending + sum(1 for s in self._active if s.caller == caller) >= self.per_caller:
            raise StreamRefused(f"you have {self.per_caller} relayed links, the most this relay carries for one "
                                "member; try again later", "RELAY_REFUSED")

    def _handshake_due(self, relayed: _Relayed) -> None:
        if not (relayed.caller_end.carried and relayed.target_end.carried):
            self._cut(relayed, f"no TLS handshake within {HANDSHAKE_TIMEOUT:g}s")
        else:
            self._watch_idle(relayed)

    def _watch_idle(self, relayed: _Relayed) -> None:
        relayed.seen = relayed.carried()
        relayed.timer = self.reactor.callLater(IDLE_TIMEOUT, self._idle_due, relayed)

    def _idle_due(self, relayed: _Relayed) -> None:
        if relayed.carried() == relayed.seen:
            self._cut(relayed, f"idle for {IDLE_TIMEOUT:g}s")
        else:
            self._watch_idle(relayed)

    def _cut(self, relayed: _Relayed, why: str) -> None:
        log.info("relayed link {caller} → {target} cut: {why}", caller=relayed.caller, target=relayed.target,
                 why=why)
        self._ended(relayed)
        for end in (relayed.caller_end, relayed.target_end):
            if end.transport is not None:
                end.transport.abortConnection()

    def _ended(self, relayed: _Relayed) -> None:
        if relayed in self._active:
            self._active.remove(relayed)
            relayed.stop_timer()
            self._bytes_ended += relayed.carried()

    def summary(self) -> dict:
        return {"active": self.active, "total": self.total, "bytes": self.bytes}
