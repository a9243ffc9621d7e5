"""``MuxStream``: one byte stream of a multiplexed peer link (``malai.peer.mux``), as the
transport of an ordinary Twisted protocol.

The application protocol sees what a TCP connection gives it: ``write``,
``writeSequence``, ``loseConnection`` (END_STREAM, then the stream ends),
``loseWriteConnection`` (END_STREAM only: a half-close, ``writeConnectionLost``
on an ``IHalfCloseableProtocol``), ``abortConnection`` (RST_STREAM),
``registerProducer``, and ``pauseProducing``/``resumeProducing`` to stop and
restart its own ``dataReceived``. ``getPeer``/``getHost`` return the link's
``PeerAddress``, whose ``peer`` is the verified ID52.

Back-pressure is HTTP/2 flow control. Received bytes are acknowledged to the
peer only once ``dataReceived`` took them: a paused reader keeps at most one
stream window buffered here (in pieces of up to 64 KiB, however small the
frames were) and stalls only its own stream. Outgoing bytes
wait here while the stream's send window is empty or the link's transport is
paused; above ``high_water`` buffered bytes the registered producer is paused,
below ``low_water`` resumed, and a writer that ignores that and buffers more
than ``max_buffer`` loses its stream.

The two directions end independently (two flags, not a state machine): the
stream is over when our END_STREAM is sent and the peer's has been delivered,
or when either side resets it, or when the link goes.
"""

from collections import deque
from typing import Deque, Mapping, Tuple, Union

import attrs
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IPushProducer, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from malai.errors import MalaiError
from malai.p2p.link import PeerAddress

__all__ = ["MuxStream", "StreamRefused", "StreamRequest", "StreamReset"]


class StreamRefused(MalaiError):
    """A stream the peer (or the link) would not open. ``code`` names the cause for
    programs (``NOT_ALLOWED``, ``DRAINING``, ``TOO_MANY_STREAMS``…), the message for people."""

    def __init__(self, reason: str, code: str = "REFUSED"):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class StreamReset(ConnectionLost):
    """The peer reset the stream (RST_STREAM with ``error_code``)."""

    def __init__(self, error_code: int, text: str):
        super().__init__(text)
        self.error_code = error_code


@attrs.frozen
class StreamRequest:
    """What an opener asked for, as the responder sees it."""

    peer: PeerAddress  # the verified peer that opened the stream
    kind: str  # exec, tcp, http, relay, control…
    target: str  # what of that kind: a service name, a command…
    headers: Mapping[str, str] = attrs.field(factory=dict)  # the opener's other headers
    stream_id: int = 0


_NO_ERROR, _CANCEL = 0x0, 0x8
#: Pieces held for a paused reader are merged up to this size: a window's worth of one-byte
#: frames is then a few entries, not a million.
_MERGE = 64 * 1024


@implementer(ITransport, IConsumer, IPushProducer)
class MuxStream:
    """The transport of one stream's application protocol (see the module docstring)."""

    log = Logger()
    disconnecting = False

    def __init__(self, link, stream_id: int, request: StreamRequest):
        self.link = link
        self.stream_id = stream_id
        self.request = request
        self.protocol = None
        self.connected = False
        # outgoing: the application's bytes not yet framed, and its producer
        self.outbox: Deque[Union[bytes, memoryview]] = deque()
        self.outbox_bytes = 0
        self.producer = None
        self.streaming = False
        self.producer_paused = False
        self._pulling = False
        self.end_wanted = False  # loseConnection / loseWriteConnection asked for END_STREAM
        self.local_ended = False  # END_STREAM sent (or the peer reset the stream)
        self._closing = False  # loseConnection: reading stops as well
        # incoming: bytes the application has not taken yet, with their flow-controlled length
        self._inbox: Deque[Tuple[Union[bytes, bytearray], int]] = deque()
        self._reading_paused = False
        self._delivering = False
        self.remote_ended = False  # END_STREAM received
        self._read_done = False  # ... and delivered
        self.ended = False  # connectionLost delivered

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {self.request.kind} {self.request.target!r}>"

    # -- the link drives these ---------------------------------------------------
    def attach(self, protocol) -> None:
        """Connect ``protocol``; what arrived while it was being built is delivered now."""
        self.protocol = protocol
        self.connected = True
        self._call(protocol.makeConnection, self)
        self._deliver()

    def data_received(self, data: bytes, flow_length: int) -> None:
        if self.ended or self._closing:
            self.link.ack(self.stream_id, flow_length)
            return
        inbox = self._inbox
        if data and not inbox and not self._reading_paused and not self._delivering and self.protocol is not None:
            self._delivering = True  # what _deliver does for one piece, without the inbox
            try:
                self._call(self.protocol.dataReceived, data)
            finally:
                self._delivering = False
            self.link.ack(self.stream_id, flow_length)
            return
        if inbox and len(inbox[-1][0]) + len(data) <= _MERGE:  # held: small pieces are merged
            held, held_length = inbox[-1]
            if type(held) is not bytearray:
                held = bytearray(held)
            held += data
            inbox[-1] = (held, held_length + flow_length)
        else:
            inbox.append((data, flow_length))
        self._deliver()

    def remote_end(self) -> None:
        self.remote_ended = True
        self._deliver()

    def reset_by_peer(self, error_code: int) -> None:
        """RST_STREAM from the peer. NO_ERROR after its END_STREAM means "send no more": what it
        sent is still delivered and the stream ends cleanly; anything else cuts it now."""
        self.local_ended = True
        self._drop_outbox()
        if error_code == _NO_ERROR and self.remote_ended:
            self._deliver()
            self._maybe_finished()
            return
        self._drop_inbox()
        self.finish(Failure(StreamReset(error_code, f"the peer reset the stream ({_code_name(error_code)})")))

    def sent(self) -> None:
        """The link framed some of the outbox, or can again: producers and pulls follow."""
        if self.ended:
            return
        self.update_producer()
        if self.producer is not None and not self.streaming:
            self._pull()

    def wrote_end(self) -> None:
        """Our END_STREAM went out."""
        self.local_ended = True
        if self._closing and not self.remote_ended:
            self.link.reset(self, _NO_ERROR)  # loseConnection: the peer may stop sending
            self._read_done = True
        elif IHalfCloseableProtocol.providedBy(self.protocol) and not self._closing:
            self._call(self.protocol.writeConnectionLost)
        self._maybe_finished()

    def finish(self, reason: Failure, now: bool = False) -> None:
        """The stream is over: the link forgets it now, the application hears of it in the
        next reactor turn (as from a TCP transport: never from inside its own call), or
        ``now`` when the link itself is lost (the reactor may not turn again: shutdown)."""
        if self.ended:
            return
        self.ended = True
        self.connected = False
        self.disconnecting = True
        self._drop_inbox()
        self._drop_outbox()
        self.link.forget(self)
        if now:
            self._lost(reason)
        else:
            self.link.clock.callLater(0, self._lost, reason)

    def _lost(self, reason: Failure) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            self._call(producer.stopProducing)
        if self.protocol is not None:
            self._call(self.protocol.connectionLost, reason)

    # -- incoming ------------------------------------------------------------------
    def _deliver(self) -> None:
        if self._delivering or self.protocol is None:
            return
        self._delivering = True
        try:
            while self._inbox and not self._reading_paused and not self.ended:
                data, flow_length = self._inbox.popleft()
                if data:
                    self._call(self.protocol.dataReceived, bytes(data) if type(data) is bytearray else data)
                self.link.ack(self.stream_id, flow_length)
        finally:
            self._delivering = False
        if (self.remote_ended and not self._inbox and not self._reading_paused and not self._read_done
                and not self.ended):
            self._read_done = True
            if self._closing:
                self._maybe_finished()
            elif IHalfCloseableProtocol.providedBy(self.protocol):
                self._call(self.protocol.readConnectionLost)
                self._maybe_finished()
            else:
                self.loseConnection()  # like TCP: a protocol that cannot half-close is closed

    def _drop_inbox(self) -> None:
        """Forget what was not delivered; the peer gets its window back."""
        while self._inbox:
            self.link.ack(self.stream_id, self._inbox.popleft()[1])

    def _drop_outbox(self) -> None:
        self.outbox.clear()
        self.outbox_bytes = 0

    def _maybe_finished(self) -> None:
        if self.local_ended and self._read_done:
            self.finish(Failure(ConnectionDone()))

    def _call(self, method, *args) -> None:
        """Call the application; an exception from it ends this stream only."""
        try:
            method(*args)
        except Exception:
            self.log.failure("{stream} on the link with {peer}", stream=self, peer=self.link.peer.peer)
            self.abortConnection()

    # -- ITransport --------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not data or self.end_wanted or self.ended:
            return
        if type(data) is not bytes:
            data = bytes(data)  # a view of a buffer the caller may change before it is sent
        if not self.outbox and self.link.send_now(self, data):
            self.update_producer()
            return
        self.outbox.append(data)
        self.outbox_bytes += len(data)
        if self.outbox_bytes > self.link.settings.max_stream_buffer:
            self.log.warn("{stream} on the link with {peer}: its writer buffered over {limit} bytes: reset",
                          stream=self, peer=self.link.peer.peer, limit=self.link.settings.max_stream_buffer)
            self.abortConnection()
            return
        self.link.want_send(self)

    def writeSequence(self, data) -> None:
        for chunk in data:
            self.write(chunk)

    def loseWriteConnection(self) -> None:
        """Send END_STREAM once what was written has gone; keep reading."""
        if self.end_wanted or self.ended:
            return
        self.end_wanted = True
        self.link.want_send(self)

    def loseConnection(self) -> None:
        """Send what was written and END_STREAM; read no more."""
        if self.ended:
            return
        self._closing = self.disconnecting = True
        self._drop_inbox()
        if self.local_ended:
            self._read_done = True
            self._maybe_finished()
        else:
            self.loseWriteConnection()

    def abortConnection(self) -> None:
        """Reset the stream now (RST_STREAM CANCEL); unsent bytes are dropped."""
        if self.ended:
            return
        self.link.reset(self, _CANCEL)
        self.finish(Failure(ConnectionAborted()))

    def take(self, limit: int) -> Tuple[list, int]:
        """Up to ``limit`` bytes from the outbox, for one DATA frame: the pieces (not copied:
        the link joins them with the frame header) and their size."""
        outbox = self.outbox
        parts = []
        size = 0
        while outbox and size < limit:
            chunk = outbox[0]
            room = limit - size
            if len(chunk) > room:
                view = memoryview(chunk)
                parts.append(view[:room])
                outbox[0] = view[room:]
                size = limit
            else:
                parts.append(outbox.popleft())
                size += len(chunk)
        self.outbox_bytes -= size
        return parts, size

    def getPeer(self) -> PeerAddress:
        return self.link.peer

    def getHost(self) -> PeerAddress:
        return self.link.peer

    def logPrefix(self) -> str:
        return f"stream {self.stream_id} with {self.link.peer.peer}"

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nothing to do: the link's socket has Nagle off already."""

    # -- IConsumer: the application's producer ---------------------------------------
    def registerProducer(self, producer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"{self!r} already has a producer")
        if self.ended:
            producer.stopProducing()
            return
        self.producer, self.streaming, self.producer_paused = producer, streaming, False
        self.sent()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False
        self.link.stalled.discard(self)

    def update_producer(self) -> None:
        """Pause the streaming producer when it writes while the link is paused or while more than
        ``high_water`` bytes wait here; resume it once the link runs and under ``low_water`` wait."""
        producer = self.producer
        if producer is None or not self.streaming:
            return
        link = self.link
        if self.producer_paused:
            if not link.paused and self.outbox_bytes <= link.settings.low_water:
                self.producer_paused = False
                link.stalled.discard(self)
                producer.resumeProducing()
        elif link.paused or self.outbox_bytes > link.settings.high_water:
            self.producer_paused = True
            link.stalled.add(self)
            producer.pauseProducing()

    def _pull(self) -> None:
        """Ask a pull producer for more while what it gives can leave at once."""
        if self._pulling:
            return
        self._pulling = True
        link = self.link
        link.stalled.discard(self)
        try:
            while self.producer is not None and not self.streaming and not self.outbox and not self.ended:
                if not link.can_send(self):
                    link.stalled.add(self)  # asked again when the window opens or the link resumes
                    break
                before = link.bytes_sent
                self.producer.resumeProducing()
                if link.bytes_sent == before and not self.outbox:
                    break  # it wrote nothing: it will write later or unregister
        finally:
            self._pulling = False

    # -- IPushProducer: the application stops and restarts its dataReceived -----------
    def pauseProducing(self) -> None:
        self._reading_paused = True

    def resumeProducing(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._deliver()

    def stopProducing(self) -> None:
        self.loseConnection()


def _code_name(code: int) -> str:
    from h2.errors import ErrorCodes
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"
