"""The multiplexed peer link (malai/peer/mux.py, malai/peer/streams.py).

Unit tests drive two ``MuxLink``s (or a ``MuxLink`` and a hand-written HTTP/2 peer)
through an in-memory pump and a fake clock; ``RealLinkTests`` runs them over real
pinned TLS on loopback.
"""

import gc

import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from malai.identity import Identity
from malai.p2p.link import PeerAddress, connect_verified, server_factory
from malai.p2p.tls import PeerTLS
from malai.peer.commands import Ping
from malai.peer.mux import MuxLink, MuxLinkFactory, MuxSettings, StreamEndpoint, StreamRefused
from malai.peer.protocol import HelloInfo, PeerAMPFactory
from malai.peer.streams import MuxStream, StreamReset

A, B = "a" * 52, "b" * 52  # stand-ins for the two ID52s


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Keeps what arrives and how the stream ended."""

    def __init__(self, label=""):
        self.label = label
        self.data = bytearray()
        self.read_lost = self.write_lost = False
        self.lost = None

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.read_lost = True

    def writeConnectionLost(self):
        self.write_lost = True

    def connectionLost(self, reason):
        self.lost = reason


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@implementer(IPushProducer)
class Producer:
    def __init__(self):
        self.paused = False
        self.stopped = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True


class Responder:
    """Answers streams with protocols from ``make`` and keeps the requests and protocols."""

    def __init__(self, make=Recorder):
        self.make = make
        self.requests = []
        self.protocols = []

    def __call__(self, request):
        self.requests.append(request)
        protocol = self.make()
        self.protocols.append(protocol)
        return protocol


class Blackhole(iosim.FakeTransport):
    """A transport that can silently drop everything written to it."""

    dropping = False

    def write(self, data):
        if not self.dropping:
            super().write(data)


def pair(testcase, dialer_responder=None, listener_responder=None, dialer_settings=MuxSettings(),
         listener_settings=MuxSettings(), control=(None, None), greet=True, clock=None):
    """A dialer and a listener link joined by a pump: (dialer, listener, pump, clock)."""
    clock = clock or Clock()
    dialer = MuxLink(PeerAddress(A, B), True, dialer_responder, control[0], dialer_settings, clock)
    listener = MuxLink(PeerAddress(B, A), False, listener_responder, control[1], listener_settings, clock)
    pump = iosim.connect(listener, Blackhole(listener, True), dialer, Blackhole(dialer, False), greet=greet,
                         clock=clock)
    return dialer, listener, pump, clock


def open_stream(link, pump, kind="tcp", target="svc", headers=None):
    protocol = Recorder()
    d = link.open(kind, target, protocol, headers or {})
    pump.flush()
    return protocol, d


def one_stream(testcase):
    """Linked dialer and listener with one stream: (dialer, listener, pump, opener, answerer)."""
    on_listener = Responder()
    dialer, listener, pump, _ = pair(testcase, None, on_listener)
    opener, _ = open_stream(dialer, pump)
    [answerer] = on_listener.protocols
    return dialer, listener, pump, opener, answerer


class StreamTests(SynchronousTestCase):
    def test_streams_open_in_both_directions_and_carry_data_both_ways(self):
        on_listener, on_dialer = Responder(), Responder()
        dialer, listener, pump, _ = pair(self, on_dialer, on_listener)
        up, d = open_stream(dialer, pump, "tcp", "mysql", {"malai-caller": "alice"})
        self.assertIs(self.successResultOf(d), up)
        [request] = on_listener.requests
        self.assertEqual((request.kind, request.target, request.headers, request.stream_id),
                         ("tcp", "mysql", {"malai-caller": "alice"}, 1))
        self.assertEqual(request.peer.peer, A)  # the verified peer, as the link knows it
        # the listener opens a stream on the link the dialer made (even stream IDs)
        down, d = open_stream(listener, pump, "exec", "uptime")
        self.assertIs(self.successResultOf(d), down)
        self.assertEqual([(r.kind, r.target, r.stream_id) for r in on_dialer.requests], [("exec", "uptime", 2)])
        self.assertEqual(up.transport.getPeer().peer, B)
        up.transport.write(b"ping")
        down.transport.writeSequence([b"from ", b"the listener"])
        on_listener.protocols[0].transport.write(b"pong")
        on_dialer.protocols[0].transport.write(b"hello back")
        pump.flush()
        self.assertEqual(bytes(on_listener.protocols[0].data), b"ping")
        self.assertEqual(bytes(up.data), b"pong")
        self.assertEqual(bytes(on_dialer.protocols[0].data), b"from the listener")
        self.assertEqual(bytes(down.data), b"hello back")

    def test_half_close_each_way(self):
        dialer, listener, pump, opener, answerer = one_stream(self)
        opener.transport.write(b"request")
        opener.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(bytes(answerer.data), b"request")
        self.assertTrue(answerer.read_lost)
        self.assertTrue(opener.write_lost)
        self.assertIsNone(answerer.lost)
        # the other direction still flows after the half-close
        answerer.transport.write(b"answer")
        pump.flush()
        self.assertEqual(bytes(opener.data), b"answer")
        self.assertFalse(opener.read_lost)
        answerer.transport.loseWriteConnection()
        pump.flush()
        self.assertTrue(opener.read_lost)
        for protocol in (opener, answerer):
            protocol.lost.trap(ConnectionDone)
        self.assertEqual((dialer.streams, listener.streams), ({}, {}))

    def test_answerer_half_closes_first(self):
        dialer, listener, pump, opener, answerer = one_stream(self)
        answerer.transport.write(b"banner")
        answerer.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual((bytes(opener.data), opener.read_lost, answerer.write_lost), (b"banner", True, True))
        opener.transport.write(b"late words")
        opener.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(bytes(answerer.data), b"late words")
        answerer.lost.trap(ConnectionDone)
        opener.lost.trap(ConnectionDone)

    def test_a_protocol_that_cannot_half_close_is_closed_at_end_of_input(self):
        dialer, listener, pump, _ = pair(self, None, Responder(Echo))
        opener, _ = open_stream(dialer, pump)
        opener.transport.write(b"echo me")
        opener.transport.loseWriteConnection()
        pump.flush()
        self.assertEqual(bytes(opener.data), b"echo me")
        self.assertTrue(opener.read_lost)
        opener.lost.trap(ConnectionDone)
        self.assertEqual(listener.streams, {})

    def test_lose_connection_sends_what_was_written_then_ends_both_ways(self):
        dialer, listener, pump, opener, answerer = one_stream(self)
        opener.transport.write(b"last words")
        opener.transport.loseConnection()
        answerer.transport.write(b"nobody reads this")
        pump.flush()
        self.assertEqual(bytes(answerer.data), b"last words")
        self.assertTrue(answerer.read_lost)
        opener.lost.trap(ConnectionDone)
        answerer.lost.trap(ConnectionDone)  # the opener's RST_STREAM(NO_ERROR): it wants no more
        self.assertEqual(bytes(opener.data), b"")
        self.assertEqual((dialer.streams, listener.streams), ({}, {}))

    def test_reset_of_one_stream_leaves_the_others_alone(self):
        on_listener = Responder()
        dialer, listener, pump, _ = pair(self, None, on_listener)
        first, _ = open_stream(dialer, pump)
        second, _ = open_stream(dialer, pump)
        third, _ = open_stream(dialer, pump)
        first.transport.write(b"abc")
        first.transport.abortConnection()
        on_listener.protocols[2].transport.abortConnection()  # and one reset from the other side
        second.transport.write(b"still here")
        pump.flush()
        first.lost.trap(ConnectionAborted)
        reset = on_listener.protocols[0].lost
        reset.trap(StreamReset)
        self.assertEqual(reset.value.error_code, ErrorCodes.CANCEL)
        third.lost.trap(StreamReset)
        self.assertIn("CANCEL", third.lost.getErrorMessage())
        self.assertEqual(bytes(on_listener.protocols[1].data), b"still here")
        on_listener.protocols[1].transport.write(b"and answering")
        pump.flush()
        self.assertEqual(bytes(second.data), b"and answering")
        self.assertIsNone(second.lost)
        self.assertEqual(list(dialer.streams), [3])

    def test_an_exception_in_a_stream_protocol_resets_that_stream_only(self):
        class Broken(Protocol):
            def dataReceived(self, data):
                raise ValueError("bug")

        made = [Broken(), Recorder()]
        dialer, listener, pump, _ = pair(self, None, lambda request: made.pop(0))
        broken, _ = open_stream(dialer, pump)
        fine, _ = open_stream(dialer, pump)
        broken.transport.write(b"x")
        fine.transport.write(b"y")
        pump.flush()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        broken.lost.trap(StreamReset)
        self.assertIsNone(fine.lost)
        self.assertFalse(dialer._gone)

    def test_refusal_carries_a_reason_and_leaves_nothing_behind(self):
        def refuse(request):
            raise StreamRefused(f"no {request.kind} service {request.target!r} for you", "NOT_ALLOWED")

        dialer, listener, pump, _ = pair(self, None, refuse)
        protocol, d = open_stream(dialer, pump, "tcp", "secret")
        error = self.failureResultOf(d, StreamRefused).value
        self.assertEqual((error.code, str(error)), ("NOT_ALLOWED", "no tcp service 'secret' for you"))
        self.assertIsNone(protocol.transport)  # the protocol never ran
        self.assertEqual((dialer.streams, listener.streams), ({}, {}))
        self.assertEqual(listener._conn.open_inbound_streams, 0)
        self.assertEqual(dialer._conn.open_outbound_streams, 0)

    def test_a_responder_that_fails_is_an_internal_error_for_the_caller(self):
        dialer, listener, pump, _ = pair(self, None, lambda request: defer.fail(KeyError("detail")))
        _, d = open_stream(dialer, pump)
        error = self.failureResultOf(d, StreamRefused).value
        self.assertEqual((error.code, str(error)), ("INTERNAL", "internal error"))  # no detail leaks
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_a_slow_responder_buffers_early_bytes_and_a_reset_cancels_it(self):
        answers, cancelled = [], []

        def slowly(request):
            answers.append(defer.Deferred(cancelled.append))
            return answers[-1]

        dialer, listener, pump, _ = pair(self, None, slowly)
        waiting, d = open_stream(dialer, pump)
        self.assertNoResult(d)
        later, d2 = open_stream(dialer, pump)
        answer = Recorder()
        answers[1].callback(answer)
        pump.flush()
        self.assertIs(self.successResultOf(d2), later)
        d.cancel()  # the opener gives up: RST_STREAM, and the responder's Deferred is cancelled
        pump.flush()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(cancelled, [answers[0]])
        self.assertEqual(list(listener.streams), [3])

    def test_a_refusal_reason_in_any_language_reaches_the_caller(self):
        def refuse(request):
            raise StreamRefused("dienst \u00abdb\u00bb ist aus\r\n  (wartung)", "UPSTREAM_FAILED")

        dialer, listener, pump, _ = pair(self, None, refuse)
        _, d = open_stream(dialer, pump)
        error = self.failureResultOf(d, StreamRefused).value
        self.assertEqual((error.code, error.reason), ("UPSTREAM_FAILED", "dienst \u00abdb\u00bb ist aus (wartung)"))

    def test_a_request_too_large_for_headers_is_refused_before_sending(self):
        dialer, listener, pump, _ = pair(self, None, Responder())
        _, d = open_stream(dialer, pump, "exec", "x", {"malai-argv": "a" * 60000})
        self.assertIn("send large parameters in the stream", str(self.failureResultOf(d, StreamRefused).value))
        self.assertEqual(listener._conn.highest_inbound_stream_id, 0)

    def test_when_stream_ids_run_out_the_link_drains(self):
        dialer, listener, pump, _ = pair(self, None, Responder())
        running, _ = open_stream(dialer, pump)
        dialer._conn.highest_outbound_stream_id = 2 ** 31 - 1  # as after two billion streams
        _, d = open_stream(dialer, pump)
        self.assertEqual(self.failureResultOf(d, StreamRefused).value.code, "DRAINING")
        self.assertTrue(dialer.draining and listener.peer_draining)
        self.assertIsNone(running.lost)  # the open stream finishes first

    def test_opens_past_the_peers_limit_wait_their_turn(self):
        dialer, listener, pump, _ = pair(self, None, Responder(), dialer_settings=MuxSettings(max_queued_opens=1),
                                         listener_settings=MuxSettings(max_concurrent_streams=2))
        first, _ = open_stream(dialer, pump)
        open_stream(dialer, pump)
        third, waiting = open_stream(dialer, pump)
        self.assertNoResult(waiting)
        _, d = open_stream(dialer, pump)  # past the queue's bound
        error = self.failureResultOf(d, StreamRefused).value
        self.assertEqual(error.code, "TOO_MANY_STREAMS")
        self.assertIn("takes 2 streams at once on a link and 1 more wait already", str(error))
        first.transport.loseConnection()
        pump.flush()
        self.assertIs(self.successResultOf(waiting), third)
        self.assertFalse(dialer._gone)

    def test_a_queued_open_can_be_cancelled_and_fails_when_the_link_goes(self):
        dialer, listener, pump, _ = pair(self, None, Responder(), listener_settings=MuxSettings(max_concurrent_streams=1))
        open_stream(dialer, pump)
        _, cancelled = open_stream(dialer, pump)
        _, lost = open_stream(dialer, pump)
        cancelled.cancel()
        self.failureResultOf(cancelled, defer.CancelledError)
        self.assertEqual(len(dialer._queued), 1)
        dialer.close("test")
        pump.flush()
        self.assertEqual(self.failureResultOf(lost, StreamRefused).value.code, "LINK_CLOSED")

    def test_bad_requests_are_refused_and_the_link_stays(self):
        dialer, listener, pump, _ = pair(self, None, Responder())
        for kind, target, headers in [("Tcp", "x", {}), ("tcp", "a\nb", {}), ("tcp", "x", {"malai-kind": "exec"}),
                                      ("tcp", "x", {"Upper": "1"}), ("control", "", {})]:
            _, d = open_stream(dialer, pump, kind, target, headers)
            self.assertEqual(self.failureResultOf(d, StreamRefused).value.code, "BAD_REQUEST", (kind, target, headers))
        self.assertFalse(dialer._gone or listener._gone)


class BackPressureTests(SynchronousTestCase):
    settings = MuxSettings(stream_window=64 * 1024, link_window=1 << 20, high_water=128 * 1024,
                           low_water=32 * 1024)

    def test_a_stopped_reader_stalls_only_its_own_stream(self):
        on_listener = Responder()
        dialer, listener, pump, _ = pair(self, None, on_listener, self.settings, self.settings)
        slow, _ = open_stream(dialer, pump)
        fast, _ = open_stream(dialer, pump)
        slow_reader, fast_reader = on_listener.protocols
        slow_reader.transport.pauseProducing()
        producers = Producer(), Producer()
        slow.transport.registerProducer(producers[0], True)
        fast.transport.registerProducer(producers[1], True)
        block = b"z" * (1 << 20)
        slow.transport.write(block)
        fast.transport.write(block)
        pump.flush()
        self.assertEqual(len(fast_reader.data), len(block))  # the other stream went through in full
        self.assertFalse(producers[1].paused)
        self.assertEqual(len(slow_reader.data), 0)
        self.assertTrue(producers[0].paused)  # the slow stream's writer is paused...
        slow_stream = listener.streams[1]
        held = sum(len(data) for data, _ in slow_stream._inbox)
        self.assertEqual(held, self.settings.stream_window)  # ... after one window, held unacknowledged
        self.assertEqual(slow.transport.outbox_bytes, len(block) - held)
        slow_reader.transport.resumeProducing()
        pump.flush()
        self.assertEqual(bytes(slow_reader.data), block)
        self.assertFalse(producers[0].paused)

    def test_stopped_readers_cannot_stall_the_link_below_its_window(self):
        on_listener = Responder()
        dialer, listener, pump, _ = pair(self, None, on_listener, self.settings, self.settings)
        opened = [open_stream(dialer, pump)[0] for _ in range(15)]  # 15 full stream windows < the link window
        for reader in on_listener.protocols[:-1]:
            reader.transport.pauseProducing()
        for stream in opened:
            stream.transport.write(b"q" * (200 * 1024))
        pump.flush()
        self.assertEqual(len(on_listener.protocols[-1].data), 200 * 1024)

    def test_the_paused_link_pauses_a_writer_and_resumes_it(self):
        dialer, listener, pump, _ = pair(self, None, Responder(), self.settings, self.settings)
        writer, _ = open_stream(dialer, pump)
        producer = Producer()
        writer.transport.registerProducer(producer, True)
        dialer.pauseProducing()  # the TLS transport is full
        writer.transport.write(b"a")
        self.assertTrue(producer.paused)
        pump.flush()
        self.assertEqual(writer.transport.outbox_bytes, 1)  # nothing framed while paused
        dialer.resumeProducing()
        self.assertFalse(producer.paused)
        pump.flush()
        self.assertEqual(bytes(listener.streams[1].protocol.data), b"a")

    def test_a_pull_producer_is_asked_while_the_window_allows(self):
        class Pull:
            def __init__(self, transport):
                self.transport, self.left = transport, 40

            def resumeProducing(self):
                if self.left:
                    self.left -= 1
                    self.transport.write(b"p" * 16384)
                else:
                    self.transport.unregisterProducer()
                    self.transport.loseWriteConnection()

            def stopProducing(self):
                pass

        dialer, listener, pump, _ = pair(self, None, Responder(), self.settings, self.settings)
        writer, _ = open_stream(dialer, pump)
        pull = Pull(writer.transport)
        writer.transport.registerProducer(pull, False)
        self.assertEqual(pull.left, 40 - 4)  # one window's worth, then it waits for WINDOW_UPDATE
        pump.flush()
        reader = listener.streams[1].protocol
        self.assertEqual((len(reader.data), reader.read_lost), (40 * 16384, True))

    def test_a_writer_ignoring_back_pressure_loses_its_stream(self):
        settings = MuxSettings(max_stream_buffer=1 << 20)
        dialer, listener, pump, _ = pair(self, None, Responder(), settings, settings)
        writer, _ = open_stream(dialer, pump)
        listener.streams[1].protocol.transport.pauseProducing()
        writer.transport.write(b"w" * (2 << 20))  # window + buffer < 2 MiB
        writer.transport.write(b"w" * (2 << 20))
        pump.flush()
        writer.lost.trap(ConnectionAborted)
        self.assertFalse(dialer._gone)


class LifetimeTests(SynchronousTestCase):
    def test_ping_measures_the_round_trip(self):
        dialer, listener, pump, clock = pair(self, greet=False)
        self.assertIsNone(dialer.rtt)
        clock.advance(0.25)
        pump.flush()
        self.assertEqual((dialer.rtt, listener.rtt), (0.25, 0.25))
        clock.advance(5)  # the next PING, answered at once
        pump.flush()
        self.assertEqual(dialer.rtt, 0)

    def test_a_link_that_hears_nothing_for_15_seconds_closes(self):
        dialer, listener, pump, clock = pair(self)
        for _ in range(12):  # a quiet but live link stays: PINGs are answered
            clock.advance(5)
            pump.flush()
        self.assertFalse(dialer._gone)
        pump.clientIO.dropping = pump.serverIO.dropping = True  # a blackhole, not a reset
        clock.advance(14.9)
        pump.flush()
        self.assertFalse(dialer._gone)
        clock.advance(0.1)
        pump.flush()
        self.assertTrue(dialer._gone and listener._gone)
        self.assertEqual(dialer.reason, "no answer for 15 s")
        self.successResultOf(dialer.closed)

    def test_drain_refuses_new_streams_and_lets_open_ones_finish(self):
        on_listener = Responder()
        dialer, listener, pump, clock = pair(self, None, on_listener)
        running, _ = open_stream(dialer, pump)
        drained = listener.drain(30)
        racing = dialer.open("tcp", "svc", Recorder())  # sent before it heard
        pump.flush()
        self.assertEqual(self.failureResultOf(racing, StreamRefused).value.code, "DRAINING")
        self.assertTrue(dialer.peer_draining)
        self.assertFalse(dialer.accepting)
        _, d = open_stream(dialer, pump)
        self.assertEqual(self.failureResultOf(d, StreamRefused).value.code, "DRAINING")
        _, d = open_stream(listener, pump)
        self.assertEqual(self.failureResultOf(d, StreamRefused).value.code, "DRAINING")
        # the open stream keeps working, and its end ends the link
        running.transport.write(b"more")
        pump.flush()
        answerer = on_listener.protocols[0]
        self.assertEqual(bytes(answerer.data), b"more")
        self.assertNoResult(drained)
        running.transport.loseWriteConnection()
        answerer.transport.loseWriteConnection()
        pump.flush()
        running.lost.trap(ConnectionDone)
        self.assertIs(self.successResultOf(drained), listener)
        self.assertEqual((listener.reason, dialer.reason), ("drained", "closed by the peer"))
        self.successResultOf(dialer.closed)

    def test_drain_cuts_streams_still_open_after_the_drain_time(self):
        dialer, listener, pump, clock = pair(self, None, Responder())
        stuck, _ = open_stream(dialer, pump)
        drained = dialer.drain(10)
        told_first = []
        drained.addCallback(lambda link: told_first.append(stuck.lost is not None))
        clock.advance(9)
        pump.flush()
        self.assertNoResult(drained)
        clock.advance(1)
        pump.flush()
        self.successResultOf(drained)
        self.assertEqual(told_first, [True])  # streams hear of a lost link at once (shutdown may follow)
        stuck.lost.trap(ConnectionLost)
        self.assertIn("the drain time is over", stuck.lost.getErrorMessage())

    def test_ten_thousand_streams_leave_nothing_behind(self):
        dialer, listener, pump, _ = pair(self, None, lambda request: Echo())

        def round_of(count):
            opened = []
            for _ in range(count):
                protocol = Recorder()
                dialer.open("tcp", "svc", protocol)
                opened.append(protocol)
            pump.flush()
            for protocol in opened:
                protocol.transport.write(b"x")
                protocol.transport.loseWriteConnection()
            pump.flush()
            assert all(bytes(p.data) == b"x" and p.lost.check(ConnectionDone) for p in opened)

        round_of(100)  # warm up
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(100):
            round_of(100)
        gc.collect()
        after = len(gc.get_objects())
        self.assertEqual(dialer._conn.highest_outbound_stream_id, 2 * 10100 - 1)
        for link in (dialer, listener):
            self.assertEqual((link.streams, link._opening, link._answering, link._sending, link.stalled),
                             ({}, {}, {}, {}, set()))
            self.assertLessEqual(len(link._conn._closed_streams), link._conn.MAX_CLOSED_STREAMS)
        self.assertEqual([o for o in gc.get_objects() if isinstance(o, MuxStream) and o.link in (dialer, listener)],
                         [])
        self.assertLess(after - before, 100, "objects left behind by 10,000 streams")
        # and the link windows are whole again
        self.assertEqual(dialer._conn.outbound_flow_control_window, listener._conn.inbound_flow_control_window)

    def test_with_a_control_stream_it_comes_first(self):
        clock = Clock()
        control = PeerAMPFactory(HelloInfo(), dialer=False, clock=clock).buildProtocol
        dialer, listener, pump, _ = pair(self, None, Responder(), control=(None, control), clock=clock)
        _, d = open_stream(dialer, pump)
        error = self.failureResultOf(d, StreamRefused).value
        self.assertEqual((error.code, str(error)), ("BAD_REQUEST", "the control stream comes first"))

    def test_control_stream_carries_amp_both_ways_and_ends_the_link(self):
        clock = Clock()
        control = (PeerAMPFactory(HelloInfo(), dialer=True, clock=clock).buildProtocol,
                   PeerAMPFactory(HelloInfo(), dialer=False, clock=clock).buildProtocol)
        dialer, listener, pump, _ = pair(self, control=control, clock=clock)
        self.successResultOf(dialer.ready)
        self.successResultOf(listener.ready)
        self.successResultOf(dialer.control.ready)
        pump.flush()
        self.successResultOf(listener.control.ready)
        answer = dialer.callRemote(Ping, payload=b"up")
        back = listener.callRemote(Ping, payload=b"down")
        pump.flush()
        self.assertEqual(self.successResultOf(answer)["payload"], b"up")
        self.assertEqual(self.successResultOf(back)["payload"], b"down")
        dialer.control.transport.loseConnection()
        pump.flush()
        self.assertEqual(dialer.reason, "the control stream ended")
        self.assertTrue(listener._gone)


def frames_in(data: bytes):
    """The HTTP/2 frames in ``data``."""
    frames = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        frames.append(frame)
        data = data[9 + length:]
    return frames


class RawPeer(Protocol):
    """A hand-written HTTP/2 client: sends whatever frames a test makes."""

    def __init__(self):
        self.received = b""
        self.lost = None
        self.encoder = hpack.Encoder()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = reason

    def send(self, *frames, preface=True):
        out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize() if preface else b""
        self.transport.write(out + b"".join(frame.serialize() for frame in frames))

    def ack_settings(self):
        """Acknowledge the link's two SETTINGS frames: its limits apply from now."""
        self.transport.write(SettingsFrame(0, flags=["ACK"]).serialize() * 2)

    def headers(self, stream_id, headers, flags=("END_HEADERS",)):
        return HeadersFrame(stream_id, self.encoder.encode(headers), flags=list(flags))

    def goaway_code(self):
        [goaway] = [f for f in frames_in(self.received) if isinstance(f, GoAwayFrame)]
        return goaway.error_code


REQUEST = [(":method", "CONNECT"), (":authority", "svc"), ("malai-kind", "tcp")]


class RawPeerTestCase(SynchronousTestCase):
    """A ``MuxLink`` (the listener) attached to a ``RawPeer``."""

    def attach(self, responder=None, settings=MuxSettings()):
        clock = Clock()
        self.events = self.enterContext(capturedLogs())
        self.link = MuxLink(PeerAddress(B, A), False, responder or Responder(), None, settings, clock)
        self.peer = RawPeer()
        self.pump = iosim.connect(self.link, iosim.FakeTransport(self.link, True), self.peer,
                                  iosim.FakeTransport(self.peer, False), clock=clock)
        return self.link, self.peer, self.pump

    def assertLinkLost(self, code, words):
        self.pump.flush()
        self.assertTrue(self.link._gone)
        self.assertIn(words, self.link.reason)
        [warning] = [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn]  # one line
        self.assertIn(f"closing the link with {A}: {words}", warning)
        self.assertEqual(self.peer.goaway_code(), code)
        self.peer.lost.trap(ConnectionDone)


class AdversarialTests(RawPeerTestCase):

    def test_garbage_instead_of_http2_loses_the_link(self):
        link, peer, pump = self.attach()
        peer.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        pump.flush()
        self.assertTrue(link._gone)
        self.assertIn("protocol error: Invalid HTTP/2 preamble", link.reason)

    def test_garbage_frames_lose_the_link(self):
        link, peer, pump = self.attach()
        peer.send()
        peer.transport.write(b"\x00\x00\x08\x06\x00\x00\x00\x00\x07" + b"12345678")  # PING on stream 7
        self.assertLinkLost(ErrorCodes.PROTOCOL_ERROR, "protocol error")

    def test_data_past_the_stream_window_loses_the_link(self):
        settings = MuxSettings(stream_window=65535)
        link, peer, pump = self.attach(settings=settings)
        peer.send(peer.headers(1, REQUEST))
        pump.flush()
        chunks = [DataFrame(1, b"d" * 16384) for _ in range(4)] + [DataFrame(1, b"d" * 10)]
        peer.send(*chunks, preface=False)
        self.assertLinkLost(ErrorCodes.FLOW_CONTROL_ERROR, "protocol error")
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_oversized_headers_lose_the_link(self):
        link, peer, pump = self.attach()
        peer.send()
        pump.flush()
        peer.ack_settings()
        big = REQUEST + [("malai-x", "v" * 70000)]
        block = peer.encoder.encode(big)
        parts = [block[i:i + 16000] for i in range(0, len(block), 16000)]
        frames = [HeadersFrame(1, parts[0])] + [ContinuationFrame(1, part) for part in parts[1:]]
        frames[-1].flags.add("END_HEADERS")
        peer.send(*frames, preface=False)
        self.assertLinkLost(ErrorCodes.ENHANCE_YOUR_CALM, "protocol error")

    def test_more_streams_than_the_limit_lose_the_link(self):
        link, peer, pump = self.attach(lambda request: defer.Deferred(), MuxSettings(max_concurrent_streams=2))
        peer.send()
        pump.flush()
        peer.ack_settings()  # the peer knows the limit, and ignores it
        peer.send(*(peer.headers(i, REQUEST) for i in (1, 3, 5)), preface=False)
        self.assertLinkLost(ErrorCodes.PROTOCOL_ERROR, "protocol error")

    def test_bytes_sent_before_the_answer_wait_for_the_responder(self):
        answer = defer.Deferred()
        link, peer, pump = self.attach(lambda request: answer)
        peer.send(peer.headers(1, REQUEST), DataFrame(1, b"early"))
        pump.flush()
        [stream] = link.streams.values()
        self.assertIsNone(stream.protocol)  # nothing reached a protocol before it was accepted
        reader = Recorder()
        answer.callback(reader)
        pump.flush()
        self.assertEqual(bytes(reader.data), b"early")

    def test_a_large_frame_right_behind_the_settings_ack_is_taken(self):
        link, peer, pump = self.attach()
        peer.send(peer.headers(1, REQUEST))
        pump.flush()
        ack = SettingsFrame(0, flags=["ACK"]).serialize() * 2
        peer.transport.write(ack + DataFrame(1, b"b" * 65536).serialize())  # one chunk
        pump.flush()
        self.assertFalse(link._gone)
        self.assertEqual(len(link.streams[1].protocol.data), 65536)

    def test_an_overlong_frame_is_refused_at_its_header(self):
        link, peer, pump = self.attach()
        peer.send()
        pump.flush()
        peer.ack_settings()
        peer.transport.write(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"x" * 100)  # 16 MiB announced
        self.assertLinkLost(ErrorCodes.FRAME_SIZE_ERROR, "protocol error: Received overlong frame")

    def test_requests_not_of_this_protocol_are_refused_on_their_stream(self):
        link, peer, pump = self.attach()
        peer.send(peer.headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")]),
                  peer.headers(3, [(":method", "CONNECT"), (":authority", "svc")]),
                  peer.headers(5, [(":method", "CONNECT"), (":authority", "svc"), ("malai-kind", "tcp"),
                                   ("malai-kind", "exec")]))
        pump.flush()
        answers = [f for f in frames_in(peer.received) if isinstance(f, HeadersFrame)]
        decoder = hpack.Decoder()
        statuses = [dict(decoder.decode(f.data))[":status"] for f in answers]
        self.assertEqual(statuses, ["400", "400", "400"])
        self.assertFalse(link._gone)
        self.assertEqual(link.streams, {})

    def test_a_peer_that_does_not_read_cannot_fill_memory_with_answers(self):
        link, peer, pump = self.attach()
        peer.send()
        pump.flush()
        link.pauseProducing()  # our transport is full: the peer reads nothing
        flood = PingFrame(0, b"12345678").serialize() * 70000  # each PING asks for a PING ACK
        peer.transport.write(flood)
        pump.flush()
        self.assertTrue(link._gone)
        self.assertEqual(link.reason, "the peer does not read what it asks for")

    def test_window_update_overflow_loses_the_link(self):
        link, peer, pump = self.attach()
        peer.send(WindowUpdateFrame(0, window_increment=2 ** 31 - 1))
        self.assertLinkLost(ErrorCodes.FLOW_CONTROL_ERROR, "protocol error")

    def test_a_goaway_from_the_peer_ends_the_link(self):
        on_listener = Responder()
        link, peer, pump = self.attach(on_listener)
        peer.send(peer.headers(1, REQUEST))
        pump.flush()
        peer.send(GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.NO_ERROR), preface=False)
        pump.flush()
        self.assertEqual(link.reason, "closed by the peer")
        on_listener.protocols[0].lost.trap(ConnectionLost)


class FastPathTests(RawPeerTestCase):
    """Plain DATA and WINDOW_UPDATE frames bypass h2 (``_H2Connection``'s fast path); every
    other frame, and every DATA frame that does not qualify, is h2's."""

    def test_a_transfer_each_way_bypasses_h2_and_keeps_its_windows(self):
        dialer, listener, pump, opener, answerer = one_stream(self)
        given_to_h2 = []
        for link in (dialer, listener):
            receive = link._conn.receive_data
            link._conn.receive_data = lambda data, receive=receive: (given_to_h2.append(bytes(data)), receive(data))[1]
        block = bytes(range(256)) * 12289  # three MiB and change: windows reopen many times
        opener.transport.write(block)
        answerer.transport.write(block[::-1])
        pump.flush()
        self.assertEqual((bytes(answerer.data), bytes(opener.data)), (block, block[::-1]))
        self.assertEqual(given_to_h2, [])
        for sender, receiver in ((dialer, listener), (listener, dialer)):
            self.assertEqual(sender._conn.outbound_flow_control_window, receiver._conn.inbound_flow_control_window)
            self.assertEqual(sender._conn.streams[1].outbound_flow_control_window,
                             receiver._conn.streams[1].inbound_flow_control_window)

    def test_a_write_that_fits_a_frame_is_one_frame(self):
        dialer, listener, pump, opener, answerer = one_stream(self)
        sent = []
        write = dialer.transport.write
        dialer.transport.write = lambda data: (sent.append(bytes(data)), write(data))[1]
        for _ in range(3):
            opener.transport.write(b"r" * 65536)
            pump.flush()
        self.assertEqual([len(f.data) for f in frames_in(b"".join(sent)) if isinstance(f, DataFrame)], [65536] * 3)

    def test_frames_arriving_a_byte_at_a_time(self):
        link, peer, pump = self.attach()
        peer.send(peer.headers(1, REQUEST))
        pump.flush()
        peer.ack_settings()
        pump.flush()
        reader = link.streams[1].protocol
        payloads = [b"a", bytes(range(256)) * 64, b"b" * 65536, b"c" * 3]
        frames = [DataFrame(1, payload) for payload in payloads]
        frames.insert(2, PingFrame(0, b"12345678"))
        frames.insert(3, WindowUpdateFrame(1, window_increment=1000))
        wire = b"".join(frame.serialize() for frame in frames)
        for i in range(len(wire)):
            link.dataReceived(wire[i:i + 1])
        pump.flush()
        self.assertEqual(bytes(reader.data), b"".join(payloads))
        self.assertFalse(link._gone)
        self.assertEqual(link._conn.streams[1].outbound_flow_control_window, 65535 + 1000)
        self.assertIn(PingFrame, [type(f) for f in frames_in(peer.received)])  # the PING was answered

    def test_padded_and_last_data_frames_are_h2s(self):
        link, peer, pump = self.attach()
        peer.send(peer.headers(1, REQUEST), DataFrame(1, b"abc", pad_length=10, flags=["PADDED"]),
                  DataFrame(1, b"def", flags=["END_STREAM"]))
        pump.flush()
        reader = link.streams[1].protocol
        self.assertEqual((bytes(reader.data), reader.read_lost), (b"abcdef", True))

    def test_data_inside_a_header_block_loses_the_link(self):
        link, peer, pump = self.attach()
        peer.send(peer.headers(1, REQUEST))
        pump.flush()
        peer.send(peer.headers(3, REQUEST, flags=()), DataFrame(1, b"x"), preface=False)  # no CONTINUATION
        self.assertLinkLost(ErrorCodes.PROTOCOL_ERROR, "protocol error: Invalid frame during header block")

    def test_a_window_update_past_the_limit_resets_its_stream_only(self):
        link, peer, pump = self.attach()
        peer.send(peer.headers(1, REQUEST), peer.headers(3, REQUEST))
        pump.flush()
        first, second = link.streams[1].protocol, link.streams[3].protocol
        peer.send(WindowUpdateFrame(1, window_increment=2 ** 31 - 1), preface=False)
        pump.flush()
        [reset] = [f for f in frames_in(peer.received) if isinstance(f, RstStreamFrame)]
        self.assertEqual((reset.stream_id, reset.error_code), (1, ErrorCodes.FLOW_CONTROL_ERROR))
        self.assertIsNotNone(first.lost)
        self.assertIsNone(second.lost)
        self.assertFalse(link._gone)

    def test_tiny_frames_for_a_stopped_reader_are_held_in_few_pieces(self):
        link, peer, pump = self.attach()
        peer.send(peer.headers(1, REQUEST))
        pump.flush()
        reader = link.streams[1].protocol
        reader.transport.pauseProducing()
        peer.send(*(DataFrame(1, bytes([i % 256])) for i in range(20000)), preface=False)
        pump.flush()
        self.assertLessEqual(len(link.streams[1]._inbox), 1)
        reader.transport.resumeProducing()
        self.assertEqual(bytes(reader.data), bytes(i % 256 for i in range(20000)))


class RealLinkTests(TestCase):
    """Two real endpoints with pinned TLS on loopback."""

    def setUp(self):
        self.client = Identity.generate()
        self.server = Identity.generate()
        self.routed = []
        self.server_links = []

    def listen(self, responder, control=None):
        factory = MuxLinkFactory(False, responder, control)

        def route(addr):
            self.routed.append(addr)
            link = factory.buildProtocol(addr)
            self.server_links.append(link)
            return link

        port = reactor.listenTCP(0, server_factory(PeerTLS([self.server]), route), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def dial(self, port, responder=None, control=None):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        d = connect_verified(PeerTLS([self.client]), self.client, self.server.id52, endpoint,
                             MuxLinkFactory(True, responder, control))

        def cleanup(link):
            self.addCleanup(lambda: (link.transport.abortConnection(), link.closed)[1])
            return link

        return d.addCallback(cleanup)

    @defer.inlineCallbacks
    def test_fifty_concurrent_streams_on_one_tcp_connection(self):
        port = self.listen(lambda request: Echo())
        link = yield self.dial(port)

        class Exchange(Recorder):
            def __init__(self, size):
                super().__init__()
                self.size = size
                self.done = defer.Deferred()

            def dataReceived(self, data):
                self.data += data
                if len(self.data) == self.size:
                    self.transport.loseWriteConnection()

            def connectionLost(self, reason):
                self.lost = reason
                self.done.callback(self)

        size = 256 * 1024
        exchanges = [Exchange(size) for _ in range(50)]
        yield defer.gatherResults([link.open("tcp", f"echo{i}", e) for i, e in enumerate(exchanges)])
        self.assertEqual(len(link.streams), 50)
        payloads = [bytes([i]) * size for i in range(50)]
        for exchange, payload in zip(exchanges, payloads, strict=True):
            exchange.transport.write(payload)
        yield defer.gatherResults([e.done for e in exchanges])
        for exchange, payload in zip(exchanges, payloads, strict=True):
            self.assertEqual(bytes(exchange.data), payload)
            exchange.lost.trap(ConnectionDone)
        self.assertEqual(len(self.routed), 1)  # one TCP connection, one TLS handshake
        self.assertEqual(self.routed[0].peer, self.client.id52)
        self.assertEqual(link.streams, {})
        self.assertIsNotNone(link.rtt)

    @defer.inlineCallbacks
    def test_a_link_nested_in_a_stream_like_a_relay(self):
        """A stream carries a second pinned TLS link end to end (a relay splices such streams)."""
        inner_server = Identity.generate()

        def inner_route(addr):
            return MuxLinkFactory(False, lambda request: Echo()).buildProtocol(addr)

        inner_factory = server_factory(PeerTLS([inner_server]), inner_route)
        port = self.listen(lambda request: inner_factory.buildProtocol(request.peer))
        outer = yield self.dial(port)
        inner = yield connect_verified(PeerTLS([self.client]), self.client, inner_server.id52,
                                       StreamEndpoint(outer, "relay", inner_server.id52), MuxLinkFactory(True))
        self.assertEqual(inner.peer.peer, inner_server.id52)
        exchange = Recorder()
        yield inner.open("tcp", "echo", exchange)
        exchange.transport.write(b"through two links")
        while len(exchange.data) < 17:
            yield deferLater(0.01)
        self.assertEqual(bytes(exchange.data), b"through two links")
        inner.close("done")
        yield inner.closed
        self.assertEqual(inner.reason, "done")

    @defer.inlineCallbacks
    def test_amp_on_the_control_stream_over_tls(self):
        port = self.listen(None, PeerAMPFactory(HelloInfo(), dialer=False).buildProtocol)
        link = yield self.dial(port, control=PeerAMPFactory(HelloInfo(), dialer=True).buildProtocol)
        yield link.ready
        yield link.control.ready
        answer = yield link.callRemote(Ping, payload=b"hi")
        self.assertEqual(answer["payload"], b"hi")


def deferLater(seconds):
    from twisted.internet.task import deferLater as later
    return later(reactor, seconds, lambda: None)
