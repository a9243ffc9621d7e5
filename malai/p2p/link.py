"""A verified link: the application protocol starts only once TLS has pinned the peer.

``_Gate`` stands in for the application protocol during the handshake. When
the handshake completes it reads the verified peer ID52, asks who wants the
link (the router on the listening side, the waiting dialer on the other) and
hands the TLS transport to that protocol; if nobody does, the link closes.
"""

from typing import Callable, Optional

import attrs
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from malai.errors import MalaiError
from malai.identity import Identity
from malai.p2p.tls import PeerTLS, peer_id52_of

__all__ = [
    "HandshakeFailed", "PeerAddress", "WrongPeer", "connect_verified", "no_delay", "server_factory"]


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


@implementer(IHandshakeListener)
class _Gate(Protocol):
    log = Logger()

    def connectionMade(self) -> None:
        no_delay(self.transport)

    def __init__(self, build: Router, local: Optional[str], hint: Optional[str], done: Optional[Deferred]):
        self._build = build
        self._local = local
        self._hint = hint
        self._done = done

    def handshakeCompleted(self) -> None:
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
                 done: Optional[Deferred] = None):
        self._args = (build, local, hint, done)

    def buildProtocol(self, addr) -> _Gate:
        return _Gate(*self._args)


def server_factory(tls: PeerTLS, route: Router) -> TLSMemoryBIOFactory:
    """A factory for listening endpoints: each link goes to ``route(PeerAddress)``."""
    return TLSMemoryBIOFactory(tls, False, _GateFactory(route))


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
    done.chainDeferred(result)
    return result
