"""``PeerAMP``: AMP on the control stream of a verified link (``malai.peer.mux``), opened by a
``Hello`` exchange."""

from typing import Callable, Optional

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

import malai
from malai.p2p.link import PeerAddress
from malai.peer.commands import PROTOCOL_VERSION, Hello, IncompatibleVersion, Ping

__all__ = ["MAX_BOX_BYTES", "MAX_BOX_KEYS", "HelloInfo", "PeerAMP", "PeerAMPFactory", "QuietAMP"]

#: The most one box may hold, on the wire and in keys: a ``Chunked`` config body of
#: thousands of machines fits; a box past either limit closes the connection.
MAX_BOX_BYTES = 4 * 1024 * 1024
MAX_BOX_KEYS = 256


@attrs.frozen
class HelloInfo:
    """What this side says about itself in ``Hello``."""

    protocol: int = PROTOCOL_VERSION
    features: tuple = ()
    version: str = malai.__version__
    addrs: tuple = ()


class QuietAMP(amp.AMP):
    """AMP without its two log lines per connection (every CLI command opens a control
    connection), and with bounded input.

    A box over ``MAX_BOX_BYTES`` or ``MAX_BOX_KEYS``, a box AMP cannot take (no
    command, an answer to nothing, an argument that does not parse) or a command
    failing with an error its signature does not declare costs one log line, and
    nothing more is read: the connection is aborted, or closed once AMP's error
    answer (``UNKNOWN``) for the failed command is out.
    """

    log = Logger()
    refused: Optional[str] = None  # why this connection was closed
    _box_bytes = 0
    _box_keys = 0

    def describe(self) -> str:
        return "a control connection"

    def refuse(self, why: str, abort: bool = True) -> None:
        """Log ``why`` once and ignore what else the connection sends; abort it, unless
        an error answer is to go out first (AMP closes the connection after it)."""
        if self.refused is not None:
            return
        self.refused = why
        self.log.warn("closing {conn}: {why}", conn=self.describe(), why=why)
        if abort and self.transport is not None:
            self.transport.abortConnection()

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    # -- input ------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.refused is not None:
            return
        try:
            super().dataReceived(data)
        except Exception as e:  # raised by AMP's parser or its dispatch, not by a responder
            self.refuse(f"malformed input: {_brief(e)}")

    def stringReceived(self, string: bytes) -> None:
        if self.refused is not None:
            return
        self._box_bytes += 2 + len(string)
        if string and self.state in ("init", "key"):
            self._box_keys += 1
        if self._box_bytes > MAX_BOX_BYTES or self._box_keys > MAX_BOX_KEYS:
            self.refuse(f"a box over {MAX_BOX_BYTES} bytes or {MAX_BOX_KEYS} keys")
            return
        super().stringReceived(string)
        if self.state == "init":  # the box is complete
            self._box_bytes = self._box_keys = 0

    def lengthLimitExceeded(self, length: int) -> None:
        self.refuse(f"a key of {length} bytes")

    # -- errors -------------------------------------------------------------------
    def dispatchCommand(self, box) -> Deferred:
        d = super().dispatchCommand(box)
        d.addErrback(self._command_failed, box[amp.COMMAND])
        return d

    def _command_failed(self, failure: Failure, command: bytes) -> Failure:
        if not failure.check(amp.RemoteAmpError):  # an error the command does not declare
            self.refuse(f"{command.decode('ascii', 'replace')!r} failed: {_brief(failure.value)}", abort=False)
            failure = Failure(amp.RemoteAmpError(amp.UNKNOWN_ERROR_CODE, "Unknown Error", fatal=True))
        return failure

    def unhandledError(self, failure: Failure) -> None:
        self.refuse(_brief(failure.value))
        if self.transport is not None:  # refused before, without an answer to close it
            self.transport.loseConnection()


def _brief(error: BaseException) -> str:
    """An exception as one short line, safe to log whatever the peer put in it."""
    return f"{type(error).__name__}: {repr(str(error))[1:-1][:200]}"


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

    def describe(self) -> str:
        return f"the link with {self.peer.peer}"

    def refuse(self, why: str, abort: bool = True) -> None:
        super().refuse(why, abort)
        if not abort and self._closing is None and self.transport is not None:  # nor wait for the peer forever
            self._closing = self.callLater(1, self.transport.abortConnection)

    def connectionLost(self, reason) -> None:
        self.setTimeout(None)
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        try:
            super().connectionLost(reason)
            if self.dialer and not self.ready.called:  # an accepted link that never said Hello: nobody waits
                self.ready.errback(reason)
        finally:
            self.closed.callback(self)  # whatever happened above: pools and shutdown wait for it

    def timeoutConnection(self) -> None:
        """No command for ``idle_timeout``: the link closes (its control stream ends) unless
        it carries other streams."""
        link = getattr(self.transport, "link", None)
        if link is not None and len(link.streams) > 1:
            self.resetTimeout()
            return
        self.log.debug("closing idle link to {peer}", peer=self.peer.peer)
        self.transport.loseConnection()

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
