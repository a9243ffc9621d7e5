"""Ad-hoc TCP sharing by identity, with no cluster: ``TcpShare`` and ``TcpBridge``.

``TcpShare`` listens for peer links as one sharing identity and answers ``tcp``
streams by connecting a local port. Default deny: only the ID52s of ``allow``
get a link at all (any other is closed right after the TLS handshake), and every
stream is checked against the verified peer again before anything connects.

``TcpBridge`` listens on a local port and carries each accepted connection as a
``tcp`` stream over the one link (``LinkPool``) to the sharer.
"""

from typing import FrozenSet, Iterable, List, Optional, Set

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from malai.errors import MalaiError
from malai.identity import Identity
from malai.p2p.dial import AddressBook, Dialer
from malai.p2p.link import PeerAddress, server_factory
from malai.p2p.tls import PeerTLS
from malai.peer.links import LinkPool, link_factory
from malai.peer.mux import MuxLink
from malai.peer.protocol import HelloInfo, PeerAMPFactory
from malai.peer.relay import LinkEnd, PlainEnd, Relay
from malai.peer.streams import StreamRefused, StreamRequest
from malai.peer.upstream import CONNECT_TIMEOUT, connect_quietly
from malai.services.listening import ListeningService

__all__ = ["SHARE_TARGET", "TcpBridge", "TcpShare"]

#: The target of a bridge's streams: a ``malai tcp`` sharer shares one port.
SHARE_TARGET = "share"
IDLE_TIMEOUT = 300.0  # a link with no stream and no command for this long closes


class _Listening(MultiService):
    """A service around one ``listener`` (a ``ListeningService``)."""

    listener: ListeningService

    @property
    def ready(self) -> Optional[Deferred]:
        return self.listener.ready

    def address(self) -> str:
        return self.listener.address()


class TcpShare(_Listening):
    """Shares ``host:port`` with the ID52s of ``allow``, as ``identity``, over peer links
    accepted on ``listen`` (an endpoint string). ``ready`` fires once it listens."""

    log = Logger()

    def __init__(self, reactor, identity: Identity, host: str, port: int, allow: Iterable[str], listen: str):
        super().__init__()
        self.reactor = reactor
        self.identity = identity
        self.host, self.port = host, port
        self.allow: FrozenSet[str] = frozenset(allow)
        self.links: Set[MuxLink] = set()
        self.relays: Set[Relay] = set()
        self.total = self.refused = 0
        commands = PeerAMPFactory(HelloInfo(), dialer=False, idle_timeout=IDLE_TIMEOUT, clock=reactor)
        self._accepting = link_factory(commands, self._answer, clock=reactor)
        accept = server_factory(PeerTLS([identity]), self._route, reactor)
        self.listener = ListeningService(reactor, listen, accept)
        self.listener.setServiceParent(self)

    def _route(self, addr: PeerAddress) -> Optional[MuxLink]:
        """A link from an allowed ID52 gets a ``MuxLink``; any other is closed at once."""
        if addr.local != self.identity.id52 or addr.peer not in self.allow:
            self.refused += 1
            self.log.warn("refused a link from {peer} ({where}): not in --allow", peer=addr.peer,
                          where=_where(addr))
            return None
        link = self._accepting.buildProtocol(addr)
        self.links.add(link)
        link.closed.addBoth(lambda _: self.links.discard(link))
        self.log.info("link from {peer} ({where})", peer=addr.peer, where=_where(addr))
        return link

    @inlineCallbacks
    def _answer(self, request: StreamRequest):
        """Authorise the stream against the verified peer, then connect the shared port."""
        peer = request.peer.peer
        if peer not in self.allow:
            self.refused += 1
            self.log.warn("refused a {kind} stream from {peer}: not in --allow", kind=request.kind, peer=peer)
            raise StreamRefused(f"{peer} is not allowed to use this share", "NOT_ALLOWED")
        if request.kind != "tcp" or request.target != SHARE_TARGET:
            raise StreamRefused(f"this ID52 shares one TCP port (`malai tcp-bridge`); no {request.kind} "
                                f"{request.target!r} here", "BAD_REQUEST")
        self.total += 1
        relay = Relay(f"tcp share {self.host}:{self.port} for {peer}")
        try:
            yield connect_quietly(HostnameEndpoint(self.reactor, self.host, self.port, timeout=CONNECT_TIMEOUT),
                                  relay.plain)
        except Exception as e:
            why = f"the shared port {self.host}:{self.port} does not answer: {e}".rstrip(".")
            self.log.warn("{peer}: {why}", peer=peer, why=why)
            raise StreamRefused(why, "UPSTREAM_FAILED") from None
        self.relays.add(relay)
        relay.done.addBoth(lambda _: self.relays.discard(relay))
        self.log.info("{peer} connected to {host}:{port}", peer=peer, host=self.host, port=self.port)
        link_end: LinkEnd = relay.link
        return link_end

    def stopService(self) -> Deferred:
        listening = super().stopService()
        for link in list(self.links):
            link.close("the share stopped")
        return DeferredList([listening, *(link.closed for link in list(self.links))])


class _BridgeFactory(Factory):
    """Each accepted local connection: a relay, paused until its stream to the sharer is open."""

    log = Logger()
    noisy = False

    def __init__(self, bridge: "TcpBridge"):
        self.bridge = bridge
        self.active: Set[Relay] = set()
        self.total = 0

    def buildProtocol(self, addr) -> PlainEnd:
        relay = Relay(f"tcp-bridge {addr.host}:{addr.port} → {self.bridge.peer}", self._open)
        return relay.plain

    def _open(self, relay: Relay) -> None:
        self.total += 1
        self.active.add(relay)
        relay.done.addBoth(lambda _: self.active.discard(relay))
        d = self.bridge.pool.open(self.bridge.identity, self.bridge.peer, "tcp", SHARE_TARGET, relay.link)
        d.addErrback(self._failed, relay)

    def _failed(self, failure: Failure, relay: Relay) -> None:
        relay.fail(self.bridge.explain(failure))


class TcpBridge(_Listening):
    """Listens on ``listen`` (an endpoint string) and carries each connection to the sharer
    ``peer``, as ``identity``, dialing it at ``hints``."""

    def __init__(self, reactor, identity: Identity, peer: str, hints: List[str], listen: str):
        super().__init__()
        self.identity = identity
        self.peer = peer
        self.hints = hints
        book = AddressBook()
        book.configure(peer, hints)
        self.dialer = Dialer(reactor, PeerTLS([identity]), book)
        # streams go one way: the sharer opens none on this link
        self.pool = LinkPool(self.dialer, link_factory(PeerAMPFactory(HelloInfo(), dialer=True), clock=reactor))
        self.factory = _BridgeFactory(self)
        self.listener = ListeningService(reactor, listen, self.factory)
        self.listener.setServiceParent(self)

    def connect(self) -> Deferred:
        """Fire with the link to the sharer (dialing it now), or fail with a ``MalaiError`` saying why not."""
        return self.pool.get(self.identity, self.peer).addErrback(lambda f: _raise(MalaiError(self.explain(f))))

    def explain(self, failure: Failure) -> str:
        """Why a dial or a stream to the sharer failed, for people."""
        if failure.check(ConnectionLost, ConnectionDone):  # closed as soon as the handshake verified us
            return (f"{self.peer} closed the link right after the TLS handshake: it does not allow this identity "
                    f"({self.identity.id52}); its owner adds --allow {self.identity.id52}")
        error = failure.value
        return f"{self.peer}: {error}" if isinstance(error, MalaiError) else f"{type(error).__name__}: {error}"

    def stopService(self) -> Deferred:
        listening = super().stopService()
        return DeferredList([listening, self.pool.close()])


def _raise(error: Exception):
    raise error


def _where(addr: PeerAddress) -> str:
    address = addr.address
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else "a local socket"
