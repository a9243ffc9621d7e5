"""Relaying: reaching a machine that nobody can dial, through a member it keeps a link to.

The caller dials the relay (the cluster manager) and sends ``RelayOpen
target``. The relay asks the target, over the link the target keeps open to
it, to dial back (``RelayRequest``); the target's fresh link says
``RelayAttach`` and the relay splices the two. Then the caller runs its own
pinned TLS handshake with the target inside the splice: the relay carries
ciphertext it cannot read and cannot impersonate either end.

``relay_endpoint`` makes ``relay:<id52>`` hints dialable (a plug-in of
``Dialer.kinds``); ``Relayer`` is the relay's side; ``attach`` the target's.
"""

import secrets
from typing import Dict, Optional, Set

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from malai.identity import Identity
from malai.p2p.dial import Dialer, DialError
from malai.peer.commands import RelayAttach, RelayOpen, RelayRefused, RelayRequest
from malai.peer.links import dial_ready
from malai.peer.protocol import PeerAMPFactory
from malai.peer.splice import Splice, splice_pair

__all__ = ["MAX_PER_CALLER", "MAX_STREAMS", "Relayer", "attach", "relay_endpoint"]

MAX_STREAMS = 256  # relayed streams at once, in all
MAX_PER_CALLER = 32  # of one caller (a member), waiting or spliced
MAX_PENDING_PER_CALLER = 8  # of one caller, waiting for their target to dial back
ATTACH_TIMEOUT = 10.0  # for the target to dial back
HANDSHAKE_TIMEOUT = 10.0  # after the splice, for both ends to have sent something (the inner TLS handshake)
IDLE_TIMEOUT = 3600.0  # a stream that carries nothing for this long is cut
log = Logger()


class _Capture(Factory):
    """Hands AMP's protocol switch the wrapped factory's protocol, and keeps it."""

    def __init__(self, factory: Factory):
        self.factory = factory
        self.protocol = None

    def buildProtocol(self, addr):
        self.protocol = self.factory.buildProtocol(addr)
        return self.protocol

    def clientConnectionFailed(self, connector, reason) -> None:
        pass

    def clientConnectionLost(self, connector, reason) -> None:
        pass


@implementer(IStreamClientEndpoint)
class _RelayEndpoint:
    """A stream to ``target`` through ``relay``: connects ``factory``'s protocol inside it."""

    def __init__(self, dialer: Dialer, hello_of, local: Identity, relay: str, target: str):
        self.dialer, self.hello_of, self.local, self.relay, self.target = dialer, hello_of, local, relay, target

    @inlineCallbacks
    def connect(self, factory: Factory):
        hints = self.dialer.direct_hints(self.relay)
        if not hints:
            raise DialError(f"no known address for the relay {self.relay}")
        link = None
        capture = _Capture(factory)
        try:
            link = yield self.dialer.connect(self.local, self.relay, PeerAMPFactory(self.hello_of(), dialer=True),
                                             hints)
            yield link.ready
            yield link.callRemote(RelayOpen, _protoToSwitchToFactory=capture, target=self.target)
        except RelayRefused as e:
            link.transport.loseConnection()
            raise DialError(f"relay {self.relay} refused: {e}") from None
        except BaseException:  # cancelled (a direct path won the race) or failed: leave nothing open
            if link is not None and link.transport is not None:
                link.transport.loseConnection()
            raise
        return capture.protocol


def relay_endpoint(dialer: Dialer, hello_of):
    """The ``relay`` kind for ``Dialer.kinds``; ``hello_of()`` is what to say in ``Hello``."""

    def endpoint(local: Identity, peer: str, hint: str) -> IStreamClientEndpoint:
        relay = hint.split(":", 1)[1]
        if relay == peer or relay == local.id52:
            raise DialError(f"{hint} cannot relay to itself")
        return _RelayEndpoint(dialer, hello_of, local, relay, peer)

    return endpoint


@attrs.define(eq=False)
class _Stream:
    """One relayed stream: the caller's end of the splice and the target's."""

    caller: str
    target: str
    caller_end: Splice
    target_end: Splice
    attached: Deferred
    timer: Optional[IDelayedCall] = None
    seen: int = 0  # bytes carried at the last idle check

    def carried(self) -> int:
        return self.caller_end.carried + self.target_end.carried

    def stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class Relayer:
    """The relay's side: splices waiting callers onto the targets' links back.

    Bounded: ``limit`` streams in all; per caller ``per_caller`` streams, of which
    ``pending_per_caller`` may wait for their target to dial back. A target dials
    back within ``ATTACH_TIMEOUT``; both ends then send something (the inner TLS
    handshake) within ``HANDSHAKE_TIMEOUT``; a stream that carries no byte for
    ``IDLE_TIMEOUT`` is cut.
    """

    def __init__(self, reactor, limit: int = MAX_STREAMS, per_caller: int = MAX_PER_CALLER,
                 pending_per_caller: int = MAX_PENDING_PER_CALLER):
        self.reactor = reactor
        self.limit, self.per_caller, self.pending_per_caller = limit, per_caller, pending_per_caller
        self._pending: Dict[str, _Stream] = {}  # by token
        self._active: Set[_Stream] = set()
        self.total = 0
        self.bytes = 0

    @property
    def active(self) -> int:
        return len(self._active)

    def open(self, link_to_target, caller: str, target: str) -> Deferred:
        """Fire with the caller's end of a splice once ``target`` attached (RelayRefused else)."""
        self._check_quota(caller)
        token = secrets.token_urlsafe(24)
        caller_end, target_end, _ = splice_pair()
        stream = _Stream(caller, target, caller_end, target_end, Deferred())
        self._pending[token] = stream
        stream.timer = self.reactor.callLater(ATTACH_TIMEOUT, self._fail, token,
                                              f"the target did not dial back within {ATTACH_TIMEOUT:g}s")
        asked = maybeDeferred(link_to_target.callRemote, RelayRequest, token=token)  # the link may be closing
        asked.addErrback(lambda f: self._fail(token, f"{target} did not take the request: {f.getErrorMessage()}"))
        log.info("relaying {caller} → {target}", caller=caller, target=target)
        return stream.attached

    def _check_quota(self, caller: str) -> None:
        if len(self._active) + len(self._pending) >= self.limit:
            raise RelayRefused(f"this relay carries {self.limit} streams at most; try again later")
        pending = sum(1 for s in self._pending.values() if s.caller == caller)
        if pending >= self.pending_per_caller:
            raise RelayRefused(f"{pending} of your streams wait for their target already; try again later")
        if pending + sum(1 for s in self._active if s.caller == caller) >= self.per_caller:
            raise RelayRefused(f"you have {self.per_caller} relayed streams, the most this relay carries for one "
                               "member; try again later")

    def attach(self, token: str, peer: str) -> Splice:
        """The target's link for ``token``: its end of the splice."""
        stream = self._pending.get(token)
        if stream is None or stream.target != peer:
            raise RelayRefused("no relayed stream waits for this link")
        del self._pending[token]
        stream.stop_timer()
        self._active.add(stream)
        stream.timer = self.reactor.callLater(HANDSHAKE_TIMEOUT, self._handshake_due, stream)
        stream.caller_end.on_close = stream.target_end.on_close = lambda _: self._ended(stream)
        stream.attached.callback(stream.caller_end)  # answers the caller's RelayOpen and switches its link, now
        if stream.caller_end.transport is None:  # the caller left while we waited
            stream.caller_end.on_close = stream.target_end.on_close = None
            self._active.discard(stream)
            stream.stop_timer()
            raise RelayRefused("the caller left before this link attached")
        self.total += 1
        return stream.target_end

    def _handshake_due(self, stream: _Stream) -> None:
        if not (stream.caller_end.carried and stream.target_end.carried):
            self._cut(stream, f"no TLS handshake within {HANDSHAKE_TIMEOUT:g}s")
        else:
            self._watch_idle(stream)

    def _watch_idle(self, stream: _Stream) -> None:
        stream.seen = stream.carried()
        stream.timer = self.reactor.callLater(IDLE_TIMEOUT, self._idle_due, stream)

    def _idle_due(self, stream: _Stream) -> None:
        if stream.carried() == stream.seen:
            self._cut(stream, f"idle for {IDLE_TIMEOUT:g}s")
        else:
            self._watch_idle(stream)

    def _cut(self, stream: _Stream, why: str) -> None:
        log.info("relayed stream {caller} → {target} cut: {why}", caller=stream.caller, target=stream.target,
                 why=why)
        self._ended(stream)
        for end in (stream.caller_end, stream.target_end):
            if end.transport is not None:
                end.transport.abortConnection()

    def _ended(self, stream: _Stream) -> None:
        if stream in self._active:
            self._active.remove(stream)
            stream.stop_timer()
            self.bytes += stream.carried()

    def _fail(self, token: str, why: str) -> None:
        stream = self._pending.pop(token, None)
        if stream is not None:
            stream.stop_timer()
            if not stream.attached.called:
                stream.attached.errback(RelayRefused(why))

    def summary(self) -> dict:
        return {"active": self.active, "total": self.total, "bytes": self.bytes}


@inlineCallbacks
def attach(dialer: Dialer, hello, local: Identity, relay: str, token: str, accept: Factory):
    """Dial ``relay`` afresh and attach ``token``; the caller's TLS then arrives on that
    link and is accepted by ``accept`` (the daemon's listening factory)."""
    link = yield dial_ready(dialer, local, relay, PeerAMPFactory(hello, dialer=True), dialer.direct_hints(relay))
    try:
        yield link.callRemote(RelayAttach, _protoToSwitchToFactory=_Capture(accept), token=token)
    except RelayRefused as e:
        link.transport.loseConnection()
        log.warn("relay {relay} refused our attach: {why}", relay=relay, why=e)
