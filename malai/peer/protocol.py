"""``PeerAMP``: AMP on a verified link, opened by a ``Hello`` exchange."""

from typing import Callable, Optional

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.policies import TimeoutMixin

import malai
from malai.p2p.link import PeerAddress
from malai.peer.commands import PROTOCOL_VERSION, Hello, IncompatibleVersion, Ping

__all__ = ["HelloInfo", "PeerAMP", "PeerAMPFactory", "QuietAMP"]


@attrs.frozen
class HelloInfo:
    """What this side says about itself in ``Hello``."""

    protocol: int = PROTOCOL_VERSION
    features: tuple = ()
    version: str = malai.__version__
    addrs: tuple = ()


class QuietAMP(amp.AMP):
    """AMP without its two log lines per connection (a forward opens a link per
    connection; every CLI command opens a control connection)."""

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class PeerAMP(QuietAMP, TimeoutMixin):
    """One peer link. ``ready`` fires with the peer's Hello once both sides agree.

    Commands other than ``Hello`` and ``Ping`` go to ``responder``, a
    ``CommandLocator`` built for this link's verified peer.
    """

    log = Logger()

    def __init__(self, peer: PeerAddress, hello: HelloInfo, dialer: bool,
                 responder: Optional[amp.CommandLocator] = None, idle_timeout: Optional[float] = None,
                 clock=None):
        super().__init__()
        self.peer = peer
        self.hello = hello
        self.dialer = dialer
        self.responder = responder
        self.peer_hello: Optional[dict] = None
        self.ready: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.idle_timeout = idle_timeout
        self._closing = None
        if clock is not None:
            self.callLater = clock.callLater  # type: ignore[method-assign]

    # -- connection ---------------------------------------------------------
    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(self.idle_timeout)
        if self.dialer:
            d = self.callRemote(Hello, protocol=self.hello.protocol, features=list(self.hello.features),
                                version=self.hello.version, addrs=list(self.hello.addrs))
            d.addCallbacks(self._hello_answered, self._hello_refused)

    def _hello_answered(self, answer: dict) -> None:
        if answer["protocol"] != self.hello.protocol:
            self._hello_refused(IncompatibleVersion(_mismatch(answer["protocol"], self.hello.protocol)))
            return
        self.peer_hello = answer
        self.ready.callback(answer)

    def _hello_refused(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.setTimeout(None)
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        super().connectionLost(reason)
        if self.dialer and not self.ready.called:  # an accepted link that never said Hello: nobody waits
            self.ready.errback(reason)
        self.closed.callback(self)

    def timeoutConnection(self) -> None:
        self.log.debug("closing idle link to {peer}", peer=self.peer.peer)
        self.transport.loseConnection()

    def _switchTo(self, newProto, clientFactory=None):
        """The link now belongs to one byte stream: no idle timeout, no more boxes."""
        self.setTimeout(None)
        super()._switchTo(newProto, clientFactory)

    # -- activity keeps the link open ------------------------------------------
    def ampBoxReceived(self, box) -> None:
        self.resetTimeout()
        super().ampBoxReceived(box)

    def callRemote(self, command, **kw) -> Deferred:
        self.resetTimeout()
        return super().callRemote(command, **kw)

    # -- dispatch -----------------------------------------------------------
    def locateResponder(self, name: bytes):
        if name == Hello.commandName or (self.peer_hello is not None and name == Ping.commandName):
            return super().locateResponder(name)
        if self.peer_hello is None or self.responder is None:
            return None
        return self.responder.locateResponder(name)

    @Hello.responder
    def _hello(self, protocol: int, features: list, version: str, addrs: list) -> dict:
        """Answer with this side's version; on a mismatch the dialer decides, and the link closes."""
        if protocol != self.hello.protocol:
            error = IncompatibleVersion(_mismatch(protocol, self.hello.protocol))
            self.log.warn("refused link from {peer}: {error}", peer=self.peer.peer, error=error)
            if not self.ready.called:
                self.ready.errback(error)
            self._closing = self.callLater(1, self.transport.loseConnection)  # should the dialer not
        else:
            self.peer_hello = {"protocol": protocol, "features": features, "version": version, "addrs": addrs}
            if not self.ready.called:
                # after this answer is on the wire: whatever `ready` triggers must follow it
                self.callLater(0, self._hello_done)
        return {"protocol": self.hello.protocol, "features": list(self.hello.features), "version": self.hello.version}

    def _hello_done(self) -> None:
        if not self.ready.called and self.transport is not None:
            self.ready.callback(self.peer_hello)

    @Ping.responder
    def _ping(self, payload: bytes) -> dict:
        return {"payload": payload, "version": self.hello.version}


def _mismatch(theirs: int, ours: int) -> str:
    return (f"incompatible malai peer protocol: the peer speaks version {theirs}, this side {ours}; "
            "upgrade the older side")


class PeerAMPFactory(Factory):
    """Builds ``PeerAMP`` for links of one side (dialing or accepting)."""

    def __init__(self, hello: HelloInfo, dialer: bool,
                 responder: Optional[Callable[[PeerAddress], amp.CommandLocator]] = None,
                 idle_timeout: Optional[float] = None, clock=None):
        self.hello, self.dialer, self.responder = hello, dialer, responder
        self.idle_timeout, self.clock = idle_timeout, clock

    def buildProtocol(self, addr: PeerAddress) -> PeerAMP:
        responder = self.responder(addr) if self.responder else None
        return PeerAMP(addr, self.hello, self.dialer, responder, self.idle_timeout, self.clock)
