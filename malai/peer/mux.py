"""``MuxLink``: one verified TLS link carrying every stream between two identities, as HTTP/2.

After the pinned TLS handshake (``malai.p2p.link``) the connection speaks HTTP/2
framing, driven through the sans-IO ``h2`` library. The dialer is the h2 client.

Using it
    ``MuxLinkFactory(dialer, responder, control, settings)`` builds the link for
    ``connect_verified`` (dialing) or a ``server_factory`` router (accepting): one
    link per (local identity, peer identity) pair, whichever side dialed. On it:
    ``open(kind, target, protocol, headers)`` opens a stream (``StreamEndpoint`` wraps
    it as a client endpoint); ``responder(StreamRequest)`` answers the peer's;
    ``callRemote`` sends an AMP command on the control stream; ``ready``, ``closed``,
    ``reason``, ``rtt``, ``accepting`` (false once either side drains), ``drain()``
    for shutdown, ``close(why)``. A stream's protocol is an ordinary Twisted protocol
    over a ``MuxStream`` transport (see ``malai.peer.streams``).

Streams, in both directions
    A stream opens with one HEADERS frame: ``:method CONNECT``, ``:authority <target>``,
    ``malai-kind <kind>`` and the opener's other headers (56 KiB at most: large
    parameters go in the stream). The other side's responder returns the stream's
    protocol (or a Deferred of it), or raises ``StreamRefused``: the answer is
    ``:status 200``, or a refusal whose ``malai-error`` code and ``malai-reason`` text
    fail the opener's Deferred. Nothing reaches the protocol before it is accepted;
    bytes sent early wait, unacknowledged, within the stream window.

    The dialer opens odd stream IDs, the listener even ones, each with a plain
    HEADERS frame. HTTP/2 leaves server-initiated streams to PUSH_PROMISE, but h2 (4.x)
    decides a stream's request or response role per stream, from who sent its first
    HEADERS, not per connection: an h2 server may ``send_headers`` on a new even ID
    and the h2 client gets a ``RequestReceived`` with the same validation, limits and
    flow control as for its own streams. So no subclass, no extra frame and no reverse
    request (which would cost a round trip per manager-to-machine stream): measured
    on loopback, listener-opened streams open as fast as dialer-opened ones (836/s
    and 780/s in one run, 1,133/s and 1,140/s in another, each with one exchange).
    Both ends are malai; no general-purpose HTTP/2 peer ever sees this.

Control stream
    The dialer's first stream (kind ``control``) carries the request/response
    commands; the ``control`` factory (``PeerAMPFactory.buildProtocol``) builds its
    protocol on both sides, so ``Hello`` and every AMP command of
    ``malai.peer.commands`` ride on one long-lived stream. Measured: an AMP ``Ping``
    takes 400 µs median on it, 1,160 µs as a stream of its own per call (2.9x), so
    one stream it is. With a control factory the control stream must come first, and
    the link lives as long as it does.

Back-pressure
    Per stream, by HTTP/2 flow control: received bytes are acknowledged only once the
    stream's protocol took them, so a stopped reader stalls its own stream and nothing
    else until stopped readers hold the whole link window (32 full stream windows by
    default). When the TLS transport pauses the link nothing more is framed and each
    writer is paused as soon as it writes. The link never stops reading its transport
    (two sides each waiting to write would deadlock): what a peer can make it hold is
    bounded by the windows granted, and what it queues for a peer that does not read
    (PING and SETTINGS answers) by ``max_paused_output``.

    Windows: 1 MiB per stream, 32 MiB per link, frames up to 64 KiB. The window is what
    queues in the one TCP connection ahead of every other stream: beside a 1 GiB transfer
    a 64-byte round trip had a p99 of 4-5.5 ms with 1 MiB windows, 10-20 ms with 4 MiB,
    20-31 ms with 16 MiB (2 loaded cores). Larger windows carry a lone bulk stream faster
    on a loaded machine (16 MiB: as fast as a TLS link of its own), so the trade is made
    for interactive streams. Figures and method: docs/mux-performance.md.

Cost
    h2 spends some 150 Python calls on each frame. Plain DATA and WINDOW_UPDATE frames,
    nearly all of a stream's traffic, bypass it (``_H2Connection``'s fast path), a DATA
    payload reaches its stream as its TLS records arrive, and a small write with nothing
    queued is framed at once (``send_now``): the link's own work fell from ~100 µs to ~30
    per 64-byte message per side, and to under a tenth of either side's CPU in a bulk
    transfer. The rest is what a TLS link of its own costs (pyOpenSSL, Twisted's TLS and
    reactor, the syscalls).

Limits and liveness
    SETTINGS_MAX_CONCURRENT_STREAMS (``max_concurrent_streams``): an open beyond the
    peer's limit fails at once with ``TOO_MANY_STREAMS``; a peer exceeding ours has
    broken the protocol. A PING every ``ping_interval`` measures ``rtt``; a link that
    hears nothing for ``ping_interval * missed_pings`` (15 s by default) is closed.
    h2 treats GOAWAY as the end of the connection (it refuses every frame after
    sending one and clears its output on receiving one), so ``drain`` first sets
    SETTINGS_MAX_CONCURRENT_STREAMS to 0 (the peer's opens fail with ``DRAINING``,
    opens already in flight are refused with ``DRAINING``, the peer sees
    ``peer_draining``), lets open streams finish for at most ``drain_time``, and only
    then sends GOAWAY and closes. A peer that breaks the protocol or flow control
    gets GOAWAY with h2's error code and loses its link, with one log line.
"""

import re
import struct
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set, Tuple, Union, cast

import attrs
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import (
    FrameTooLargeError,
    NoAvailableStreamIDError,
    ProtocolError,
    StreamClosedError,
    TooManyStreamsError,
)
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from h2.stream import StreamState
from hyperframe.frame import DataFrame
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from malai.p2p.link import PeerAddress, no_delay
from malai.peer.streams import MuxStream, StreamRefused, StreamRequest

__all__ = ["CONTROL", "MuxLink", "MuxLinkFactory", "MuxSettings", "Responder", "StreamEndpoint",
           "StreamRefused", "StreamRequest"]

#: The kind of the dialer's first stream, which carries AMP commands.
CONTROL = "control"

#: ``responder(request)``: the protocol for an accepted stream (or a Deferred firing with
#: it); raise (or fail with) ``StreamRefused`` to refuse.
Responder = Callable[[StreamRequest], Union[Protocol, Deferred]]

_KIND = re.compile(r"[a-z][a-z0-9-]{0,31}\Z")
_HEADER_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}\Z")
_RESERVED = frozenset({"malai-kind", "malai-error", "malai-reason"})
MAX_TARGET = 1024
MAX_REQUEST = 56 * 1024  # what a request's headers may hold (an exec request's argv); the peer accepts more
MAX_REASON = 300
ANSWERS_PER_TURN = 16  # new streams given to the responder in one reactor turn
_STATUS = {"BAD_REQUEST": b"400", "NOT_ALLOWED": b"403", "INTERNAL": b"500", "DRAINING": b"503"}


def _between(low: float, high: float):
    return [attrs.validators.ge(low), attrs.validators.le(high)]


@attrs.frozen
class MuxSettings:
    """The link's limits. Windows and frame size are chosen by bench/mux_link.py."""

    max_concurrent_streams: int = attrs.field(default=4096, validator=_between(1, 1 << 20))  # the peer's, to us
    stream_window: int = attrs.field(default=1 << 20, validator=_between(65535, (1 << 31) - 1))  # in flight
    link_window: int = attrs.field(default=32 << 20, validator=_between(65535, (1 << 31) - 1))  # all streams
    max_frame_size: int = attrs.field(default=1 << 16, validator=_between(1 << 14, (1 << 24) - 1))
    max_header_list_size: int = attrs.field(default=64 * 1024, validator=_between(4096, 1 << 20))
    high_water: int = 256 * 1024  # a writer is paused with this much waiting to be framed
    low_water: int = attrs.field(default=64 * 1024)  # ... and resumed at this much
    max_stream_buffer: int = 16 << 20  # a writer that ignores the pause loses its stream here
    max_paused_output: int = 1 << 20  # control frames queued for a peer that does not read
    max_queued_opens: int = 4096  # opens waiting for a stream to end, past the peer's limit
    ping_interval: float = attrs.field(default=5.0, validator=_between(0.1, 3600))
    missed_pings: int = attrs.field(default=3, validator=_between(1, 100))  # silent intervals before closing
    drain_time: float = 30.0  # how long open streams may finish after drain()
    close_timeout: float = 10.0  # a closing transport that does not finish is aborted

    @low_water.validator
    def _check_water(self, attribute, value) -> None:
        if not 0 <= value <= self.high_water:
            raise ValueError("low_water must be between 0 and high_water")


class _QuietDataFrame(DataFrame):
    """A received DATA frame whose repr does not hex-encode its whole payload."""

    def _body_repr(self) -> str:
        return f"<{len(self.data)} bytes>"


class _FrameBuffer(FrameBuffer):
    """h2's frame buffer, giving received DATA frames a cheap repr."""

    def __next__(self):
        frame = super().__next__()
        if type(frame) is DataFrame:
            frame.__class__ = _QuietDataFrame
        return frame


#: A frame header: length (24 bits, as 16 + 8), type, flags, stream ID.
_FRAME_HEADER = struct.Struct(">HBBBL")
_WINDOW_UPDATE = struct.Struct(">HBBBLL")
_DATA, _WINDOW_UPDATE_TYPE = 0x0, 0x8
_RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)  # a stream's states that take DATA
_SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)  # ... that send DATA
_UPDATABLE = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE, StreamState.HALF_CLOSED_LOCAL)  # WINDOW_UPDATE
_LARGEST_WINDOW = (1 << 31) - 1


class _H2Connection(H2Connection):
    """``H2Connection`` with a fast path for DATA and WINDOW_UPDATE frames, a frame size
    limit applied as soon as the peer acknowledged it, and less memory per link.

    The fast path. h2 spends some 150 Python calls on each DATA frame it receives (the
    frame parsed into objects, its repr, two state machines, events) and as many on
    each it sends (a DataFrame object serialized, the payload copied twice). For the
    common frames (DATA without END_STREAM or padding on a stream whose state takes it,
    a WINDOW_UPDATE the window takes) ``data_received_fast``, ``window_update_fast``,
    ``send_data_fast`` and ``acknowledge_fast`` do exactly the accounting h2 does (both
    flow-control windows, the same errors) and nothing else: these frames change no
    state in either state machine, so skipping them keeps h2's view whole. Every other
    frame, and every one that does not qualify, goes through h2 unchanged (``MuxLink``
    hands it over in order, and handles h2's events before it looks at the next frame).
    Output stays in order: frames written here follow whatever h2 queued before them
    (``_append``). These methods reach into h2 4.x internals (``_data_to_send``, the
    window managers, ``_headers_buffer``); tests/test_mux.py ``FastPathTests`` checks
    that both ends' windows still agree after traffic each way.

    h2 logs every frame it receives with ``repr(frame)``, computed even when nothing logs
    it; a DATA frame's repr hex-encodes its payload, hence ``_QuietDataFrame``. And h2
    remembers how each closed stream ended (to tell a late frame on a reset stream, a
    stream error, from one after END_STREAM, a connection error) for 65,536 streams,
    megabytes per busy link; 4,096 is plenty for frames still in flight.
    """

    MAX_CLOSED_STREAMS = 4096

    def __init__(self, config: H2Configuration):
        super().__init__(config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        self.incoming_buffer.max_frame_size = self.max_inbound_frame_size
        self._frame_dispatch_table[_QuietDataFrame] = self._receive_data_frame
        self._out: List[bytes] = []  # output in order: h2's own, then ours

    @property  # type: ignore[override]
    def max_inbound_frame_size(self) -> int:
        return self._max_inbound_frame_size

    @max_inbound_frame_size.setter
    def max_inbound_frame_size(self, value: int) -> None:
        # h2 gives the frame buffer the new limit only with the next received chunk: frames
        # right behind the SETTINGS ACK in the same chunk were held to the old one.
        self._max_inbound_frame_size = value
        if hasattr(self, "incoming_buffer"):
            self.incoming_buffer.max_frame_size = value

    def _append(self, chunk: bytes) -> None:
        if self._data_to_send:
            self._out.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        self._out.append(chunk)

    def data_to_send(self, amount: None = None) -> bytes:
        """All queued output (h2's and the fast path's) in one piece."""
        out = self._out
        if self._data_to_send:
            out.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def send_window(self, stream_id: int) -> int:
        """How much the next DATA frame of ``stream_id`` may carry: both windows and the frame
        size, 0 once the stream or the connection sends no more."""
        stream = self.streams.get(stream_id)
        if (stream is None or stream.state_machine.state not in _SENDING
                or self.state_machine.state is ConnectionState.CLOSED):
            return 0
        return min(self.outbound_flow_control_window, stream.outbound_flow_control_window,
                   self.max_outbound_frame_size)

    def send_data_fast(self, stream_id: int, parts: list, size: int) -> None:
        """``send_data(stream_id, b"".join(parts))`` for 0 < ``size`` <= ``send_window(stream_id)``."""
        self.outbound_flow_control_window -= size
        self.streams[stream_id].outbound_flow_control_window -= size
        self._append(_FRAME_HEADER.pack(size >> 8, size & 0xFF, _DATA, 0, stream_id))
        self._out += parts

    def data_received_fast(self, stream_id: int, flags: int, length: int) -> bool:
        """Account for a received DATA frame as ``_receive_data_frame`` would, if it qualifies
        (no flags, a stream that takes DATA and counts no content-length); else False and
        the frame is h2's. Raises ``FlowControlError`` as h2 does."""
        stream = self.streams.get(stream_id)
        if (flags or stream is None or self.incoming_buffer._headers_buffer
                or stream.state_machine.state not in _RECEIVING or not stream.state_machine.headers_received
                or stream._expected_content_length is not None):
            return False
        self._inbound_flow_control_window_manager.window_consumed(length)
        stream._inbound_window_manager.window_consumed(length)
        stream._actual_content_length += length
        return True

    def window_update_fast(self, stream_id: int, length: int, increment: int) -> bool:
        """Apply a received WINDOW_UPDATE as ``_receive_window_update_frame`` would, if it
        qualifies (a valid increment the window takes, on the connection or a stream that
        takes it); else False and the frame is h2's."""
        if length != 4 or not increment or self.incoming_buffer._headers_buffer:
            return False
        if not stream_id:
            if self.outbound_flow_control_window + increment > _LARGEST_WINDOW:
                return False
            self.outbound_flow_control_window += increment
            return True
        stream = self.streams.get(stream_id)
        if (stream is None or stream.state_machine.state not in _UPDATABLE
                or stream.outbound_flow_control_window + increment > _LARGEST_WINDOW):
            return False
        stream.outbound_flow_control_window += increment
        return True

    def acknowledge_fast(self, stream_id: int, size: int) -> None:
        """``acknowledge_received_data(size, stream_id)``: WINDOW_UPDATEs once half a window
        was taken (h2's ``WindowManager`` decides)."""
        increment = self._inbound_flow_control_window_manager.process_bytes(size)
        if increment:
            self._append(_WINDOW_UPDATE.pack(0, 4, _WINDOW_UPDATE_TYPE, 0, 0, increment))
        stream = self.streams.get(stream_id)
        if stream is not None and stream.open:
            increment = stream._inbound_window_manager.process_bytes(size)
            if increment:
                self._append(_WINDOW_UPDATE.pack(0, 4, _WINDOW_UPDATE_TYPE, 0, stream_id, increment))


def _sanitize(text: str, limit: int) -> str:
    return " ".join(text.split())[:limit]


@implementer(IPushProducer)
class MuxLink(Protocol):
    """One multiplexed link (see the module docstring).

    ``ready`` fires with the link once its control stream is connected (at once with
    no ``control``); ``closed`` fires with the link when the connection is gone, and
    ``reason`` then says why.
    """

    log = Logger()

    def __init__(self, peer: PeerAddress, dialer: bool, responder: Optional[Responder] = None,
                 control: Optional[Callable[[PeerAddress], Protocol]] = None,
                 settings: MuxSettings = MuxSettings(), clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.peer = peer
        self.dialer = dialer
        self.responder = responder
        self.control_factory = control
        self.settings = settings
        self.clock = clock
        self.control: Optional[Protocol] = None
        self.ready: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.reason: Optional[str] = None
        self.streams: Dict[int, MuxStream] = {}
        self.stalled: Set[MuxStream] = set()  # streams whose producer waits for the link or a window
        self.paused = False
        self.draining = False  # this side: no new streams, GOAWAY once the open ones end
        self.peer_draining = False  # the peer said it takes no new streams
        self.rtt: Optional[float] = None
        self.bytes_sent = 0
        self._conn = _H2Connection(H2Configuration(client_side=dialer, header_encoding=None))
        self._opening: Dict[int, Tuple[Protocol, Deferred]] = {}
        self._queued: Deque[Tuple[str, str, Protocol, Mapping[str, str], Deferred]] = deque()
        self._unanswered: Deque[MuxStream] = deque()  # opened by the peer, not yet given to the responder
        self._answer_call = None
        self._answering: Dict[int, Deferred] = {}  # responders not done yet
        self._sending: Dict[int, MuxStream] = {}  # streams with bytes or END_STREAM to frame
        self._control_stream: Optional[MuxStream] = None
        self._gone = False  # GOAWAY sent or the connection lost: no more h2 calls
        self._pumping = False
        self._receiving = False
        self._preamble = 0 if dialer else 24  # bytes of the dialer's connection preface still to come
        self._partial: List[Union[bytes, memoryview]] = []  # the start of a frame, in the chunks it came in
        self._partial_size = 0
        self._need = 0  # ... and its whole size (or 9 for its header)
        self._acks: Dict[int, int] = {}  # stream ID: bytes taken during this read
        self._cut_stream: Optional[MuxStream] = None  # the stream whose DATA frame is arriving
        self._cut_left = 0  # ... and how much of its payload is still to come
        self._paused_output = 0
        self._last_heard = 0.0
        self._ping: Optional[Tuple[bytes, float]] = None
        self._pings_sent = 0
        self._last_chance = False  # the deadline passed: one more reactor turn to read before closing
        self._timer = None
        self._drain_timer = None
        self._abort_timer = None

    # -- connection -------------------------------------------------------------------
    def connectionMade(self) -> None:
        no_delay(self.transport)
        s = self.settings
        self._conn.initiate_connection()
        self._conn.update_settings({
            SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            SettingCodes.ENABLE_PUSH: 0,
        })
        if s.link_window > 65535:
            self._conn.increment_flow_control_window(s.link_window - 65535)
        self.transport.registerProducer(self, True)
        self._last_heard = self.clock.seconds()
        self._tick()
        if self.control_factory is None:
            self.ready.callback(self)
        elif self.dialer:
            self.open(CONTROL, "", self.control_factory(self.peer)).addCallbacks(self._control_open,
                                                                                 self._control_failed)
        self._flush()

    def _control_open(self, protocol: Protocol) -> None:
        self.control = protocol
        self._control_stream = cast(MuxStream, protocol.transport)
        self.ready.callback(self)

    def _control_failed(self, reason: Failure) -> None:
        self.close(f"the control stream did not open: {reason.getErrorMessage()}")

    def dataReceived(self, data: bytes) -> None:
        """Split what arrived into frames. A qualifying DATA frame's payload goes to its stream
        as it arrives (``_cut_left`` bytes of it to come), runs of other frames go to h2 (its
        events handled before the next frame is looked at), a frame's start waits in
        ``_partial``."""
        if self._gone:
            return
        self._last_heard = self.clock.seconds()
        self._receiving = True
        try:
            if self._preamble:  # the listener's h2 checks the dialer's connection preface
                size = min(self._preamble, len(data))
                self._preamble -= size
                self._to_h2(data[:size])
                data = data[size:]
            if self._partial:
                self._partial.append(data)
                self._partial_size += len(data)
                if self._partial_size >= self._need:
                    data = b"".join(self._partial)
                    self._partial.clear()
                    self._frames(data)
            else:
                self._frames(data)
        except Exception:
            self.log.failure("the link with {peer}", peer=self.peer.peer)
            self._gone = True
            self.reason = "internal error"
            self.transport.abortConnection()
        finally:
            self._receiving = False
        if self._acks:
            if not self._gone:
                for stream_id, size in self._acks.items():
                    self._conn.acknowledge_fast(stream_id, size)
            self._acks.clear()
        self._flush()

    def _frames(self, data: bytes) -> None:
        conn = self._conn
        view = memoryview(data)
        end = len(data)
        offset = h2_from = 0  # the frames from h2_from to offset are h2's, not given to it yet
        while not self._gone:
            if self._cut_left:
                size = min(self._cut_left, end - offset)
                if not size:
                    break
                stream = self._cut_stream
                self._cut_left -= size
                if not self._cut_left:
                    self._cut_stream = None
                # a chunk that is all payload goes as it is; else its payload is copied out
                payload = data if size == end else bytes(view[offset:offset + size])
                h2_from = offset = offset + size
                stream.data_received(payload, size)
                continue
            if end - offset < 9:
                break
            high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(data, offset)
            length = high << 8 | low
            if h2_from < offset and (kind == _DATA or kind == _WINDOW_UPDATE_TYPE
                                     or length > conn.max_inbound_frame_size):
                # the frames before decide whether this one qualifies (a HEADERS opening its
                # stream) or fits (a SETTINGS ACK raising the frame size limit)
                self._to_h2(view[h2_from:offset])
                h2_from = offset
                continue
            stream_id &= 0x7FFFFFFF
            following = offset + 9 + length
            try:
                if length > conn.max_inbound_frame_size:
                    raise FrameTooLargeError(
                        f"Received overlong frame: length {length}, max {conn.max_inbound_frame_size}")
                if kind == _DATA:
                    stream = self.streams.get(stream_id)
                    if stream is not None and conn.data_received_fast(stream_id, flags, length):
                        h2_from = offset = offset + 9
                        if length:
                            self._cut_stream, self._cut_left = stream, length
                        continue
                elif kind == _WINDOW_UPDATE_TYPE and following <= end:
                    increment = int.from_bytes(view[offset + 9:following], "big") & 0x7FFFFFFF
                    if conn.window_update_fast(stream_id, length, increment):
                        h2_from = offset = following
                        self._window_opened(stream_id)
                        continue
            except ProtocolError as e:
                conn._terminate_connection(e.error_code)
                self._protocol_error(e)
                return
            if following > end:
                self._need = following - offset
                break
            offset = following
        if h2_from < offset and not self._gone:
            self._to_h2(view[h2_from:offset])
        if offset < end and not self._gone:  # the start of a frame
            if end - offset < 9:
                self._need = 9
            self._partial.append(view[offset:])
            self._partial_size = end - offset

    def _to_h2(self, frames) -> None:
        """Hand frames to h2 and handle its events."""
        try:
            events = self._conn.receive_data(frames)
        except ProtocolError as e:  # h2 queued GOAWAY with the error's code
            self._protocol_error(e)
            return
        if self._conn.state_machine.state is ConnectionState.CLOSED:
            self._gone = True  # GOAWAY came in: the events before it still count, nothing more is sent
        for event in events:
            handler = self._handlers.get(type(event))
            if handler is not None:
                handler(self, event)

    def _protocol_error(self, error: ProtocolError) -> None:
        self._flush()
        self._lose(f"protocol error: {_brief(error)}", warn=True)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._gone = True
        for timer in (self._timer, self._drain_timer, self._abort_timer, self._answer_call):
            if timer is not None and timer.active():
                timer.cancel()
        if self.reason is None:
            self.reason = "closed by the peer" if reason.check(ConnectionDone) else reason.getErrorMessage()
        lost = Failure(ConnectionLost(f"the link with {self.peer.peer} closed: {self.reason}"))
        for stream in list(self.streams.values()):
            stream.finish(lost, now=True)
        self._fail_queued(StreamRefused(f"the link with {self.peer.peer} closed: {self.reason}", "LINK_CLOSED"))
        if self.dialer and not self.ready.called:
            self.ready.errback(lost)
        self.closed.callback(self)

    # -- opening streams ----------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        """Whether new streams can open on this link."""
        return not (self._gone or self.draining or self.peer_draining)

    def open(self, kind: str, target: str, protocol: Protocol, headers: Mapping[str, str] = {}) -> Deferred:
        """Open a ``kind`` stream to ``target`` for ``protocol``; fire with ``protocol`` once the
        peer accepted it and ``connectionMade`` ran, or fail with ``StreamRefused``.
        Cancelling the Deferred resets the stream."""
        if self._gone or self.draining:
            return fail(StreamRefused(f"the link with {self.peer.peer} is closing", "DRAINING"))
        if self.peer_draining:
            return fail(StreamRefused(f"{self.peer.peer} is shutting down", "DRAINING"))
        problem = _check_request(kind, target, headers)
        if problem:
            return fail(StreamRefused(problem, "BAD_REQUEST"))
        fields = [(b":method", b"CONNECT"), (b":authority", target.encode()), (b"malai-kind", kind.encode())]
        fields += [(name.encode(), value.encode()) for name, value in headers.items()]
        try:
            stream_id = self._conn.get_next_available_stream_id()
            self._conn.send_headers(stream_id, fields)
        except TooManyStreamsError:
            return self._queue_open(kind, target, protocol, headers)
        except NoAvailableStreamIDError:
            self.drain()  # a new link takes over
            return fail(StreamRefused(f"the link with {self.peer.peer} has used all its stream IDs", "DRAINING"))
        stream = MuxStream(self, stream_id, StreamRequest(self.peer, kind, target, dict(headers), stream_id))
        self.streams[stream_id] = stream
        opened: Deferred = Deferred(lambda _: self._cancel_open(stream))
        self._opening[stream_id] = (protocol, opened)
        self._flush()
        return opened

    def _queue_open(self, kind: str, target: str, protocol: Protocol, headers: Mapping[str, str]) -> Deferred:
        """The peer's stream limit is reached: the open waits for a stream to end, in turn
        (``max_queued_opens`` at most)."""
        if len(self._queued) >= self.settings.max_queued_opens:
            return fail(StreamRefused(
                f"{self.peer.peer} takes {self._conn.remote_settings.max_concurrent_streams} streams at once on a "
                f"link and {self.settings.max_queued_opens} more wait already", "TOO_MANY_STREAMS"))
        waiting: Deferred = Deferred(lambda d: self._queued.remove(entry))
        entry = (kind, target, protocol, headers, waiting)
        self._queued.append(entry)
        return waiting

    def _fail_queued(self, error: StreamRefused) -> None:
        queued, self._queued = self._queued, deque()
        for entry in queued:
            entry[-1].errback(error)

    def _open_queued(self) -> None:
        """A stream ended: the first queued open goes now (it queues again if the slot is not free)."""
        if self._queued:
            kind, target, protocol, headers, waiting = self._queued.popleft()
            self.open(kind, target, protocol, headers).chainDeferred(waiting)

    def _cancel_open(self, stream: MuxStream) -> None:
        if self._opening.pop(stream.stream_id, None) is not None:
            self.reset(stream, ErrorCodes.CANCEL)
            stream.finish(Failure(CancelledError()))

    def _on_response(self, event: ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        opening = self._opening.pop(event.stream_id, None)
        if stream is None or opening is None:
            return
        protocol, opened = opening
        fields = dict(event.headers)
        if fields.get(b":status") == b"200":
            stream.attach(protocol)
            if stream.ended:
                opened.errback(StreamRefused("the stream ended as it opened", "RESET"))
            else:
                opened.callback(protocol)
            return
        code = fields.get(b"malai-error", b"REFUSED").decode("ascii", "replace")
        reason = fields.get(b"malai-reason", b"refused").decode("utf-8", "replace")
        self.reset(stream, ErrorCodes.CANCEL)
        stream.finish(Failure(ConnectionDone()))
        opened.errback(StreamRefused(_sanitize(reason, MAX_REASON), _sanitize(code, 40)))

    # -- answering streams ----------------------------------------------------------------
    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        fields: Dict[bytes, bytes] = {}
        for name, value in event.headers:
            if name in fields:
                fields[b""] = b""  # a repeated header: refused below
            fields[name] = value
        kind = fields.pop(b"malai-kind", b"").decode("ascii", "replace")
        target = fields.pop(b":authority", b"").decode("utf-8", "replace")
        method = fields.pop(b":method", b"")
        try:
            headers = {name.decode("ascii"): value.decode("utf-8") for name, value in fields.items()}
        except UnicodeDecodeError:
            headers = {"": ""}
        stream = MuxStream(self, stream_id, StreamRequest(self.peer, kind, target, headers, stream_id))
        self.streams[stream_id] = stream
        problem = _check_request(kind, target, headers) if method == b"CONNECT" else "not a CONNECT request"
        if problem:
            self._refuse(stream, "BAD_REQUEST", problem)
        elif self._control_stream is None and self.control_factory is not None and kind != CONTROL:
            self._refuse(stream, "BAD_REQUEST", "the control stream comes first")
        elif kind == CONTROL:
            if self.dialer or self.control_factory is None or self._control_stream is not None:
                self._refuse(stream, "BAD_REQUEST", "one control stream per link, opened by the dialer")
            else:
                self._control_stream = stream
                self.control = self.control_factory(self.peer)
                self._accept(stream, self.control)
                self.ready.callback(self)
        elif self.draining:
            self._refuse(stream, "DRAINING", "shutting down: open the stream on another link")
        elif self.responder is None:
            self._refuse(stream, "NOT_ALLOWED", f"this side takes no {kind} streams")
        else:
            self._unanswered.append(stream)
            if self._answer_call is None:
                self._answer_call = self.clock.callLater(0, self._answer_some)

    def _answer_some(self) -> None:
        """Ask the responder about up to ``ANSWERS_PER_TURN`` new streams, the rest in later
        reactor turns: a burst of opens (each may spawn a process) never keeps the link
        from reading, nor from answering PINGs, for long."""
        self._answer_call = None
        for _ in range(min(ANSWERS_PER_TURN, len(self._unanswered))):
            stream = self._unanswered.popleft()
            if stream.ended or self._gone:
                continue
            answer = maybeDeferred(cast(Responder, self.responder), stream.request)
            self._answering[stream.stream_id] = answer
            answer.addBoth(self._answered, stream)
        if self._unanswered and not self._gone:
            self._answer_call = self.clock.callLater(0, self._answer_some)

    def _answered(self, result, stream: MuxStream) -> None:
        self._answering.pop(stream.stream_id, None)
        if isinstance(result, Failure):
            if result.check(StreamRefused):
                self._refuse(stream, result.value.code, result.value.reason)
            elif not result.check(CancelledError):
                self.log.failure("answering {kind} stream {target!r} from {peer}", result, kind=stream.request.kind,
                                 target=stream.request.target, peer=self.peer.peer)
                self._refuse(stream, "INTERNAL", "internal error")
        elif result is None:
            self._refuse(stream, "NOT_ALLOWED", "refused")
        elif stream.ended:  # reset while its protocol was being built: let it clean up
            result.makeConnection(stream)
            result.connectionLost(Failure(ConnectionLost("the peer reset the stream")))
        else:
            self._accept(stream, result)
        self._flush()

    def _accept(self, stream: MuxStream, protocol: Protocol) -> None:
        if not self._gone:  # else the link's end ends the stream
            try:
                self._conn.send_headers(stream.stream_id, [(b":status", b"200")])
            except StreamClosedError:  # reset in the same read as it opened: its StreamReset ends it
                pass
        stream.attach(protocol)

    def _refuse(self, stream: MuxStream, code: str, reason: str) -> None:
        if stream.ended or self._gone:
            return
        try:
            self._conn.send_headers(stream.stream_id, [
                (b":status", _STATUS.get(code, b"403")), (b"malai-error", _sanitize(code, 40).encode()),
                (b"malai-reason", _sanitize(reason, MAX_REASON).encode())], end_stream=True)
        except StreamClosedError:  # reset by the peer meanwhile: nothing to answer
            pass
        self.reset(stream, ErrorCodes.NO_ERROR)  # frees the stream on both sides now
        stream.finish(Failure(ConnectionDone()))

    # -- the streams drive these -------------------------------------------------------------
    def ack(self, stream_id: int, flow_length: int) -> None:
        """The stream's protocol took ``flow_length`` bytes: the peer may send that much more.
        While a read is being handled this is counted and applied once it is over, so every
        frame of it is held to the windows the peer knew of."""
        if not flow_length or self._gone:
            return
        if self._receiving:
            self._acks[stream_id] = self._acks.get(stream_id, 0) + flow_length
        else:
            self._conn.acknowledge_fast(stream_id, flow_length)
            self._flush()

    def want_send(self, stream: MuxStream) -> None:
        """``stream`` has bytes or an END_STREAM to frame."""
        if self._gone:
            return
        self._sending[stream.stream_id] = stream
        self._pump()
        stream.update_producer()

    def send_now(self, stream: MuxStream, data: bytes) -> bool:
        """Frame all of ``data`` at once if the link and the windows take it (the common write:
        nothing waits in the stream's outbox), without the outbox and the pump; else False.
        Other streams wait in ``_sending`` only for their windows when the link is not paused
        and not pumping, so this passes none of them."""
        if self.paused or self._gone or self._pumping or stream.protocol is None or stream.local_ended:
            return False
        size = len(data)
        if size > self._conn.send_window(stream.stream_id):
            return False
        self._conn.send_data_fast(stream.stream_id, [data], size)
        self.bytes_sent += size
        self._flush()
        return True

    def can_send(self, stream: MuxStream) -> bool:
        return not (self.paused or self._gone) and self._conn.send_window(stream.stream_id) > 0

    def reset(self, stream: MuxStream, code: int) -> None:
        """RST_STREAM ``stream`` unless it is closed already."""
        self._sending.pop(stream.stream_id, None)
        if self._gone:
            return
        try:
            self._conn.reset_stream(stream.stream_id, code)
        except (StreamClosedError, ProtocolError):
            return
        self._flush()

    def forget(self, stream: MuxStream) -> None:
        """The stream ended: drop every reference to it."""
        stream_id = stream.stream_id
        self.streams.pop(stream_id, None)
        self._sending.pop(stream_id, None)
        self.stalled.discard(stream)
        answering = self._answering.pop(stream_id, None)
        if answering is not None:
            answering.cancel()
        opening = self._opening.pop(stream_id, None)
        if opening is not None:
            opening[1].errback(StreamRefused(f"the link with {self.peer.peer} closed: {self.reason}", "LINK_CLOSED"))
        if self._queued and not self._gone:
            self._open_queued()
        if stream is self._control_stream and not self._gone:
            self.close("the control stream ended")
        elif self.draining:
            self._maybe_drained()

    # -- framing --------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Frame what streams have to send, one frame per stream in turn, while the
        transport takes it and windows allow."""
        if self._pumping:
            return
        self._pumping = True
        try:
            progress = True
            while progress and self._sending and not self.paused and not self._gone:
                progress = False
                for stream in list(self._sending.values()):
                    if self.paused or self._gone:
                        break
                    progress = self._frame(stream) or progress
        finally:
            self._pumping = False

    def _frame(self, stream: MuxStream) -> bool:
        """Send one DATA frame (or END_STREAM) of ``stream``; whether anything went."""
        stream_id = stream.stream_id
        if stream.ended or stream.local_ended or stream.protocol is None or self._gone:
            self._sending.pop(stream_id, None)
            return False
        try:
            if stream.outbox_bytes:
                size = self._conn.send_window(stream_id)
                if size <= 0:
                    return False  # stays: WindowUpdated sends it
                parts, size = stream.take(size)
                end = stream.end_wanted and not stream.outbox
                if end:
                    self._conn.send_data(stream_id, b"".join(parts), end_stream=True)
                else:
                    self._conn.send_data_fast(stream_id, parts, size)
                self.bytes_sent += size
            elif stream.end_wanted:
                end = True
                self._conn.end_stream(stream_id)
            else:
                self._sending.pop(stream_id, None)
                return False
        except StreamClosedError:  # reset by the peer in what h2 just read: its StreamReset event follows
            self._sending.pop(stream_id, None)
            stream.outbox.clear()
            stream.outbox_bytes = 0
            return False
        if end or not stream.outbox:
            self._sending.pop(stream_id, None)
        self._flush()
        if end:
            stream.wrote_end()
        stream.sent()
        return True

    def _flush(self) -> None:
        """Hand what h2 framed to the transport."""
        data = self._conn.data_to_send()
        if not data:
            return
        if self.paused:
            self._paused_output += len(data)
            if self._paused_output > self.settings.max_paused_output and not self._gone:
                self._gone = True
                self.reason = "the peer does not read what it asks for"
                self.log.warn("closing the link with {peer}: {why}", peer=self.peer.peer, why=self.reason)
                self.transport.abortConnection()
                return
        self.transport.write(data)

    # -- IPushProducer: the TLS transport -----------------------------------------------------------
    def pauseProducing(self) -> None:
        self.paused = True
        self._paused_output = 0

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()
        self._restart_stalled()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def _restart_stalled(self) -> None:
        for stream in list(self.stalled):
            if self.paused or self._gone:
                return
            stream.sent()

    # -- h2 events --------------------------------------------------------------------------------
    def _on_data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            self.ack(event.stream_id, event.flow_controlled_length)
        else:
            stream.data_received(event.data, event.flow_controlled_length)

    def _on_end(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.remote_end()

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        opening = self._opening.pop(event.stream_id, None)
        if opening is not None:
            stream.finish(Failure(ConnectionDone()))
            opening[1].errback(StreamRefused(f"{self.peer.peer} reset the stream", "RESET"))
        else:
            stream.reset_by_peer(event.error_code)

    def _on_window(self, event: WindowUpdated) -> None:
        self._window_opened(event.stream_id)

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._pump()
                stream.sent()
        else:
            self._pump()
            self._restart_stalled()

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        changed = event.changed_settings
        limit = changed.get(SettingCodes.MAX_CONCURRENT_STREAMS)
        if limit is not None and limit.new_value == 0 and not self.peer_draining:
            self.peer_draining = True
            self.log.info("{peer} is shutting down its link: no new streams on it", peer=self.peer.peer)
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            self._pump()
            self._restart_stalled()

    def _on_ping_ack(self, event: PingAckReceived) -> None:
        if self._ping is not None and event.ping_data == self._ping[0]:
            self.rtt = self.clock.seconds() - self._ping[1]
            self._ping = None

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        if event.error_code == ErrorCodes.NO_ERROR:
            self._lose("closed by the peer")
        else:
            name = getattr(event.error_code, "name", event.error_code)
            self._lose(f"the peer closed it ({name})", warn=True)

    _handlers: Dict[type, Callable[["MuxLink", Any], None]] = {
        RequestReceived: _on_request, ResponseReceived: _on_response, DataReceived: _on_data,
        StreamEnded: _on_end, StreamReset: _on_reset, WindowUpdated: _on_window,
        RemoteSettingsChanged: _on_settings, PingAckReceived: _on_ping_ack, ConnectionTerminated: _on_goaway,
    }

    # -- liveness ---------------------------------------------------------------------------------
    def _tick(self) -> None:
        """Send a PING; close the link once nothing was heard for ``missed_pings`` intervals."""
        if self._gone:
            return
        s = self.settings
        now = self.clock.seconds()
        deadline = self._last_heard + s.ping_interval * s.missed_pings
        if now >= deadline and not self._last_chance:
            # What the peer sent may be waiting unread because this reactor was the slow one:
            # read it (one reactor turn) before deciding.
            self._last_chance = True
            self._timer = self.clock.callLater(0, self._tick)
            return
        self._last_chance = False
        if now >= deadline:
            self._timer = None
            self.reason = f"no answer for {now - self._last_heard:.0f} s"
            self.log.warn("closing the link with {peer}: {why}", peer=self.peer.peer, why=self.reason)
            self._gone = True
            self.transport.abortConnection()
            return
        if self._ping is None or now - self._ping[1] >= s.ping_interval:
            self._pings_sent += 1
            self._ping = (struct.pack(">Q", self._pings_sent), now)
            self._conn.ping(self._ping[0])
            self._flush()
        self._timer = self.clock.callLater(min(s.ping_interval, deadline - now), self._tick)

    # -- closing ----------------------------------------------------------------------------------
    def drain(self, timeout: Optional[float] = None) -> Deferred:
        """Take no new streams, let the open ones finish for at most ``timeout`` seconds
        (``drain_time``), then GOAWAY and close. Fires with the link once it is closed."""
        done: Deferred = Deferred()

        def passed(link):
            done.callback(link)
            return link

        self.closed.addBoth(passed)
        if not self.draining and not self._gone:
            self.draining = True
            self._fail_queued(StreamRefused(f"the link with {self.peer.peer} is closing", "DRAINING"))
            self._conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 0})
            self._flush()
            wait = self.settings.drain_time if timeout is None else timeout
            self._drain_timer = self.clock.callLater(wait, self._drain_over)
            self._maybe_drained()
        return done

    def _maybe_drained(self) -> None:
        if not self._gone and all(stream is self._control_stream for stream in self.streams.values()):
            self.close("drained")

    def _drain_over(self) -> None:
        self._drain_timer = None
        left = sum(stream is not self._control_stream for stream in self.streams.values())
        self.log.info("closing the link with {peer}: {n} streams still open after the drain time",
                      peer=self.peer.peer, n=left)
        self.close("the drain time is over")

    def close(self, why: str, code: int = ErrorCodes.NO_ERROR) -> None:
        """GOAWAY now and close; open streams are cut."""
        if self._gone:
            return
        self._conn.close_connection(error_code=code)
        self._flush()
        self._lose(why)

    def _lose(self, why: str, warn: bool = False) -> None:
        self._gone = True
        self.reason = self.reason or why
        if warn:
            self.log.warn("closing the link with {peer}: {why}", peer=self.peer.peer, why=why)
        self.transport.unregisterProducer()  # TLS shuts down only once its producer is gone
        self.transport.loseConnection()
        self._abort_timer = self.clock.callLater(self.settings.close_timeout, self.transport.abortConnection)

    # -- the control stream's commands ------------------------------------------------------------
    def callRemote(self, command, **kw) -> Deferred:
        """An AMP command on the control stream."""
        if self.control is None:
            return fail(StreamRefused(f"the link with {self.peer.peer} has no control stream", "LINK_CLOSED"))
        return self.control.callRemote(command, **kw)


def _check_request(kind: str, target: str, headers: Mapping[str, str]) -> Optional[str]:
    """Why a stream request is malformed, or None."""
    if not _KIND.match(kind):
        return f"invalid stream kind {kind[:40]!r}"
    if len(target) > MAX_TARGET or any(c in target for c in "\r\n\0"):
        return "invalid stream target"
    size = len(target)
    for name, value in headers.items():
        if not _HEADER_NAME.match(name) or name in _RESERVED or any(c in value for c in "\r\n\0"):
            return f"invalid stream header {name[:40]!r}"
        size += len(name) + len(value) + 32
    if size > MAX_REQUEST:
        return f"stream request headers over {MAX_REQUEST} bytes: send large parameters in the stream"
    return None


def _brief(error: BaseException) -> str:
    return repr(str(error))[1:-1][:200] or type(error).__name__


class MuxLinkFactory(Factory):
    """Builds the ``MuxLink`` of each verified link of one side (dialing or accepting):
    pass it to ``connect_verified`` or a ``server_factory`` router."""

    noisy = False

    def __init__(self, dialer: bool, responder: Optional[Responder] = None,
                 control: Optional[Callable[[PeerAddress], Protocol]] = None,
                 settings: MuxSettings = MuxSettings(), clock=None):
        self.dialer, self.responder, self.control = dialer, responder, control
        self.settings, self.clock = settings, clock

    def buildProtocol(self, addr: PeerAddress) -> MuxLink:
        return MuxLink(addr, self.dialer, self.responder, self.control, self.settings, self.clock)


@implementer(IStreamClientEndpoint)
@attrs.frozen
class StreamEndpoint:
    """A client endpoint whose connections are ``kind`` streams to ``target`` on ``link``:
    endpoint-taking code (``wrapClientTLS``, ``connectProtocol``) runs over a stream unchanged."""

    link: MuxLink
    kind: str
    target: str
    headers: Mapping[str, str] = attrs.field(factory=dict)

    def connect(self, factory) -> Deferred:
        protocol = factory.buildProtocol(self.link.peer)
        if protocol is None:
            return fail(StreamRefused("nobody wants the stream", "REFUSED"))
        return self.link.open(self.kind, self.target, protocol, self.headers)
