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
from typing import Dict, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from malai.identity import Identity
from malai.p2p.dial import Dialer, DialError
from malai.peer.commands import RelayAttach, RelayOpen, RelayRefused, RelayRequest
from malai.peer.links import dial_ready
from malai.peer.protocol import PeerAMPFactory
from malai.peer.splice import Splice, splice_pair

__all__ = ["MAX_STREAMS", "Relayer", "attach", "relay_endpoint"]

MAX_STREAMS = 256
ATTACH_TIMEOUT = 10.0
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


class Relayer:
    """The relay's side: splices waiting callers onto the targets' links back."""

    def __init__(self, reactor, limit: int = MAX_STREAMS):
        self.reactor = reactor
        self.limit = limit
        self._pending: Dict[str, Tuple[str, Splice, Deferred]] = {}
        self.active = 0
        self.total = 0
        self.bytes = 0

    def open(self, link_to_target, caller: str, target: str) -> Deferred:
        """Fire with the caller's end of a splice once ``target`` attached (RelayRefused else)."""
        if self.active + len(self._pending) >= self.limit:
            raise RelayRefused(f"this relay carries {self.limit} streams at most; try again later")
        token = secrets.token_urlsafe(24)
        ours, theirs, _ = splice_pair()
        attached: Deferred = Deferred()
        self._pending[token] = (target, theirs, attached)
        timer = self.reactor.callLater(ATTACH_TIMEOUT, self._expire, token)
        asked = link_to_target.callRemote(RelayRequest, token=token)
        asked.addErrback(lambda f: self._fail(token, f"{target} did not take the request: {f.getErrorMessage()}"))
        attached.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        attached.addCallback(lambda _: self._started(ours, theirs))
        log.info("relaying {caller} → {target}", caller=caller, target=target)
        return attached

    def attach(self, token: str, peer: str) -> Splice:
        """The target's link for ``token``: its end of the splice."""
        target, theirs, attached = self._pending.get(token, (None, None, None))
        if target is None or target != peer:
            raise RelayRefused("no relayed stream waits for this link")
        del self._pending[token]
        attached.callback(None)  # answers the caller's RelayOpen and switches its link, right now
        caller_end = theirs.other
        if caller_end is None or caller_end.transport is None:  # the caller left while we waited
            theirs.on_close = caller_end.on_close = None
            self.active -= 1
            raise RelayRefused("the caller left before this link attached")
        return theirs

    def _started(self, ours: Splice, theirs: Splice) -> Splice:
        self.active += 1
        self.total += 1
        ours.on_close = theirs.on_close = self._ended
        return ours

    def _ended(self, end: Splice) -> None:
        if end.other is not None and end.other.on_close is None:
            return  # the other end already counted this stream
        end.on_close = None
        if end.other is not None:
            end.other.on_close = None
            self.bytes += end.carried + end.other.carried
        self.active -= 1

    def _expire(self, token: str) -> None:
        self._fail(token, f"the target did not dial back within {ATTACH_TIMEOUT:g}s")

    def _fail(self, token: str, why: str) -> None:
        entry = self._pending.pop(token, None)
        if entry is not None and not entry[2].called:
            entry[2].errback(RelayRefused(why))

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
