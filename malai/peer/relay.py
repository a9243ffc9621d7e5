"""``Relay``: a plain TCP connection joined to a stream of a peer link.

The same relay serves both ends of a forward: on the member, the plain side is
the caller's local connection; on the machine, the upstream service. The
stream (``malai.peer.streams``) carries the bytes as they are, a half-close as
END_STREAM, and a cut as RST_STREAM. Each transport is the other's producer,
so a slow reader pauses the writer end to end.
"""

from typing import Callable, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from malai.p2p.link import no_delay

__all__ = ["LinkEnd", "PlainEnd", "Relay"]


class Relay:
    """Both ends of one relayed stream, and how it ended.

    ``done`` fires with None when the stream closed cleanly (both directions
    half-closed), or with the reason it was cut.
    """

    log = Logger()

    def __init__(self, label: str, on_plain_connected: Optional[Callable[["Relay"], None]] = None,
                 plain_end: Optional[Callable[["Relay"], "PlainEnd"]] = None):
        self.label = label
        self.plain = (plain_end or PlainEnd)(self)
        self.link = LinkEnd(self)
        self.on_plain_connected = on_plain_connected
        self.bytes_to_link = self.bytes_to_plain = 0
        self.done: Deferred = Deferred()
        self._pending: List[bytes] = []
        self._eof_sent = self._eof_received = False
        self._reason: Optional[str] = None
        self._quiet = False

    # -- joining --------------------------------------------------------------
    def plain_connected(self) -> None:
        no_delay(self.plain.transport)
        if not self.link.connected:
            self.plain.transport.pauseProducing()  # nowhere to send it yet
        if self.on_plain_connected is not None:
            self.on_plain_connected(self)

    def link_connected(self) -> None:
        plain, link = self.plain.transport, self.link.transport
        if plain is None or not self.plain.connected:
            self._quiet = True  # a client that gave up waiting: nothing went wrong here
            self.fail("the local connection closed before the stream opened")
            return
        if self._pending:
            link.writeSequence(self._pending)
            self._pending.clear()
        if self._eof_sent:
            link.loseWriteConnection()
        else:
            link.registerProducer(plain, True)
        plain.registerProducer(link, True)
        plain.resumeProducing()

    # -- plain side → link ------------------------------------------------------
    def from_plain(self, data: bytes) -> None:
        self.bytes_to_link += len(data)
        if self.link.connected:
            self.link.transport.write(data)
        else:
            self._pending.append(data)

    def plain_eof(self) -> None:
        self._eof_sent = True
        if self.link.connected:
            _release(self.link.transport)  # the plain side sends no more
            self.link.transport.loseWriteConnection()
            self._maybe_finished()

    def plain_lost(self, reason: Optional[Failure]) -> None:
        if self.link.connected:
            _release(self.link.transport)
            if not self._finished():
                self._reason = self._reason or _describe(reason, "the connection closed")
                if reason is None or reason.check(ConnectionDone):
                    self.link.transport.loseConnection()
                else:
                    self.link.transport.abortConnection()
            else:
                self.link.transport.loseConnection()
        elif not self._finished():  # before the stream opened (or a browser's spare connection)
            self._reason = self._reason or _describe(reason, "the connection closed before the stream opened")
            self._quiet = self._quiet or reason is None or bool(reason.check(ConnectionDone))
        self._end()

    # -- link → plain side ------------------------------------------------------
    def from_link(self, data: bytes) -> None:
        self.bytes_to_plain += len(data)
        self.plain.transport.write(data)

    def link_eof(self) -> None:
        self._eof_received = True
        plain = self.plain.transport
        if plain is None or not self.plain.connected:
            return
        # The link sends no more. Unregister it first: Twisted half-closes a
        # socket only if no paused producer is waiting for its buffer to drain.
        _release(plain)
        plain.loseWriteConnection()
        self._maybe_finished()

    def link_lost(self, reason: Optional[Failure]) -> None:
        if self.plain.connected:
            _release(self.plain.transport)
            if self._eof_received or reason is None or reason.check(ConnectionDone):
                self.plain.transport.loseConnection()  # what the far side sent is delivered, then close
            else:
                self._reason = self._reason or _describe(reason, "the peer link closed")
                self.plain.transport.abortConnection()
        self._end()

    # -- ending -------------------------------------------------------------------
    def refuse(self, answer: bytes, reason: str) -> None:
        """Answer the plain side and close it, the stream not opened (an error page, say)."""
        self._reason, self._quiet = reason, True
        if self.plain.connected:
            self.plain.transport.write(answer)
            self.plain.transport.loseConnection()

    def fail(self, reason: str) -> None:
        """Cut both ends now, remembering why."""
        self._reason = self._reason or reason
        if self.plain.connected:
            self.plain.transport.abortConnection()
        if self.link.connected:
            self.link.transport.abortConnection()
        self._end()

    def _finished(self) -> bool:
        return self._eof_sent and self._eof_received

    def _maybe_finished(self) -> None:
        if self._finished():
            self.plain.transport.loseConnection()
            self.link.transport.loseConnection()

    def _end(self) -> None:
        if self.plain.connected or self.link.connected or self.done.called:
            return
        if self._reason is not None:
            (self.log.info if self._quiet else self.log.warn)("{label}: {reason}", label=self.label,
                                                               reason=self._reason)
        self.done.callback(self._reason)


def _release(transport) -> None:
    """Stop ``transport`` pausing the other side (once: a second unregister is an error)."""
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()


def _describe(reason: Optional[Failure], default: str) -> str:
    if reason is None or reason.check(ConnectionDone):
        return default
    return reason.getErrorMessage() or default


@implementer(IHalfCloseableProtocol)
class PlainEnd(Protocol):
    """The plain TCP side of a relay."""

    def __init__(self, relay: Relay):
        self.relay = relay

    def connectionMade(self) -> None:
        self.relay.plain_connected()

    def dataReceived(self, data: bytes) -> None:
        self.relay.from_plain(data)

    def readConnectionLost(self) -> None:
        self.relay.plain_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.connected = False
        self.relay.plain_lost(reason)


@implementer(IHalfCloseableProtocol)
class LinkEnd(Protocol):
    """The stream side of a relay."""

    def __init__(self, relay: Relay):
        self.relay = relay

    def connectionMade(self) -> None:
        self.relay.link_connected()

    def dataReceived(self, data: bytes) -> None:
        self.relay.from_link(data)

    def readConnectionLost(self) -> None:
        self.relay.link_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.connected = False
        self.relay.link_lost(reason)
