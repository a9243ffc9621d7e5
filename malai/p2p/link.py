"""A verified link: the application protocol starts only once TLS has pinned the peer.

``_Gate`` stands in for the application protocol during the handshake. When
the handshake completes it reads the verified peer ID52, asks who wants the
link (the router on the listening side, the waiting dialer on the other) and
hands the TLS transport to that protocol; if nobody does, the link closes.

On the listening side a handshake has ``HANDSHAKE_TIMEOUT`` seconds to complete,
and one source address may have at most ``MAX_PENDING_PER_SOURCE`` in progress.
"""

import ipaddress
from typing import Callable, Dict, Optional

import attrs
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from malai.errors import MalaiError
from malai.identity import Identity
from malai.p2p.tls import PeerTLS, peer_id52_of

__all__ = [
    "HANDSHAKE_TIMEOUT", "MAX_PENDING_PER_SOURCE", "HandshakeFailed", "PeerAddress", "WrongPeer",
    "connect_verified", "no_delay", "server_factory"]

HANDSHAKE_TIMEOUT = 10.0
MAX_PENDING_PER_SOURCE = 128


class HandshakeFailed(MalaiError):
    """The TLS handshake did not complete."""


class WrongPeer(HandshakeFailed):
    """The peer presented a key other than the expected ID52 (or none usable)."""


@implementer(IAddress)
@attrs.frozen
class PeerAddress:
    """Who is at the other end of a verified link, and how it was reached."""

    local: str  # this side's ID52
    peer: str  # the peer's verified ID52
    address: Optional[IAddress] = None  # the underlying transport's peer address
    hint: Optional[str] = None  # the connection hint used (dialing side)


Router = Callable[[PeerAddress], Optional[Protocol]]


def no_delay(transport) -> None:
    """Turn Nagle's algorithm off: a small write (an answer, a frame) leaves at once
    instead of waiting out the peer's delayed ACK (40 ms)."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass  # not TCP (a UNIX socket, an in-memory test transport)


class _Pending:
    """Handshakes in progress per source address (an IPv6 address counts by its /64)."""

    log = Logger()

    def __init__(self, limit: int):
        self.limit = limit
        self._counts: Dict[str, int] = {}
        self._full: set = set()  # sources refused since they last had none pending: logged once

    def admit(self, address) -> Optional[str]:
        """The key to ``release`` later, "" for an address not counted; None: refused."""
        source = _source(address)
        if source is None:
            return ""
        count = self._counts.get(source, 0)
        if count >= self.limit:
            if source not in self._full:
                self._full.add(source)
                self.log.warn("{source} has {limit} TLS handshakes in progress: refusing more",
                              source=source, limit=self.limit)
            return None
        self._counts[source] = count + 1
        return source

    def release(self, source: str) -> None:
        if not source:
            return
        count = self._counts.pop(source) - 1
        if count:
            self._counts[source] = count
        else:
            self._full.discard(source)


def _source(address) -> Optional[str]:
    if isinstance(address, IPv6Address):
        return str(ipaddress.ip_network(f"{address.host.split('%')[0]}/64", strict=False))
    if isinstance(address, IPv4Address):
        return address.host
    return None  # a UNIX socket (Tor's onion service): no address to count by


@implementer(IHandshakeListener)
class _Gate(Protocol):
    log = Logger()

    def __init__(self, build: Router, local: Optional[str], hint: Optional[str], done: Optional[Deferred],
                 clock: Optional[IReactorTime] = None, pending: Optional[_Pending] = None):
        self._build = build
        self._local = local
        self._hint = hint
        self._done = done
        self._clock = clock
        self._pending = pending
        self._source: Optional[str] = None
        self._deadline: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        if self._pending is not None:
            self._source = self._pending.admit(self.transport.getPeer())
            if self._source is None:
                self.transport.abortConnection()
                return
        if self._clock is not None:
            self._deadline = self._clock.callLater(HANDSHAKE_TIMEOUT, self.transport.abortConnection)

    def _settled(self) -> None:
        """The handshake completed or the connection is gone: it no longer counts."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._source is not None:
            source, self._source = self._source, None
            self._pending.release(source)

    def handshakeCompleted(self) -> None:
        self._settled()
        conn = self.transport.getHandle()
        peer = peer_id52_of(conn)
        local = self._local or (conn.get_servername() or b"").decode("ascii", "replace")
        addr = PeerAddress(local, peer or "", self.transport.getPeer(), self._hint)
        app = self._build(addr) if peer else None
        if app is None:
            self.log.info("closing link from {peer} to {local}: not a peer of that identity", peer=peer, local=local)
            self.transport.abortConnection()
            return
        self.transport.wrappedProtocol = app
        app.makeConnection(self.transport)
        if self._done is not None:
            done, self._done = self._done, None
            done.callback(app)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self._settled()
        if self._done is not None:
            done, self._done = self._done, None
            done.errback(_explain(reason or Failure(ConnectionDone()), getattr(self.transport, "malai_verdict", None),
                                  self._hint))
        elif reason is not None and reason.check(SSL.Error):
            verdict = getattr(self.transport, "malai_verdict", None)
            self.log.info("refused a link: {why}", why=_explain(reason, verdict, None).value)


def _explain(reason: Failure, verdict, hint: Optional[str]) -> Failure:
    where = f" at {hint}" if hint else ""
    if verdict is not None and verdict.problem:
        return Failure(WrongPeer(f"peer{where} refused: {verdict.problem}"))
    if reason.check(SSL.Error):
        expected = f" {verdict.expected}" if verdict is not None and verdict.expected else ""
        return Failure(HandshakeFailed(
            f"TLS handshake{where} failed ({_ssl_text(reason.value)}): the peer does not hold identity"
            f"{expected} or refused ours"))
    return reason


def _ssl_text(error: Exception) -> str:
    try:
        return "; ".join(e[2] for e in error.args[0] if len(e) > 2) or str(error)
    except (IndexError, TypeError):
        return str(error)


class _GateFactory(Factory):
    noisy = False

    def __init__(self, build: Router, local: Optional[str] = None, hint: Optional[str] = None,
                 done: Optional[Deferred] = None, clock: Optional[IReactorTime] = None,
                 pending: Optional[_Pending] = None):
        self._args = (build, local, hint, done, clock, pending)

    def buildProtocol(self, addr) -> _Gate:
        return _Gate(*self._args)


def server_factory(tls: PeerTLS, route: Router, clock: Optional[IReactorTime] = None,
                   per_source: int = MAX_PENDING_PER_SOURCE) -> TLSMemoryBIOFactory:
    """A factory for listening endpoints: each link goes to ``route(PeerAddress)``; a handshake
    gets ``HANDSHAKE_TIMEOUT`` seconds, a source address ``per_source`` handshakes at a time."""
    if clock is None:
        from twisted.internet import reactor as clock
    return TLSMemoryBIOFactory(tls, False, _GateFactory(route, clock=clock, pending=_Pending(per_source)))


def connect_verified(tls: PeerTLS, local: Identity, expected: str, endpoint: IStreamClientEndpoint,
                     factory: Factory, hint: Optional[str] = None) -> Deferred:
    """Connect over ``endpoint`` to ``expected``; fires with ``factory``'s protocol once
    the handshake verified the peer, or fails with WrongPeer / HandshakeFailed."""
    done: Deferred = Deferred()

    def build(addr: PeerAddress) -> Optional[Protocol]:
        return factory.buildProtocol(addr)

    connected: list = []
    connecting = wrapClientTLS(tls.client_for(local, expected), endpoint).connect(
        _GateFactory(build, local.id52, hint, done))

    def failed(reason: Failure) -> None:
        if not done.called:
            done.errback(reason)

    connecting.addCallbacks(connected.append, failed)

    def cancel(_: Deferred) -> None:
        connecting.cancel()
        for gate in connected:
            gate.transport.abortConnection()

    result: Deferred = Deferred(cancel)

    def deliver(outcome) -> None:
        if not result.called:
            (result.errback if isinstance(outcome, Failure) else result.callback)(outcome)
        elif not isinstance(outcome, Failure):
            outcome.transport.abortConnection()  # verified after the caller gave up: nobody wants it

    done.addBoth(deliver)
    return result
