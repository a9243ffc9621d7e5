"""The relay's half-close and back-pressure logic (malai/peer/relay.py), with Twisted's
string transports; and a relay on a real ``MuxLink`` stream fed by a hand-written
HTTP/2 peer, for what the peer may send out of turn."""

from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, RstStreamFrame
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from malai.p2p.link import PeerAddress
from malai.peer.mux import MuxLink, MuxSettings
from malai.peer.relay import Relay
from malai.peer.streams import StreamReset
from tests.test_mux import REQUEST, RawPeer


class HalfCloseTransport(StringTransport):
    """A string transport that records half-closes and aborts too."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


class RelayLogicTests(SynchronousTestCase):
    def setUp(self):
        self.relay = Relay("test")
        self.done = []
        self.relay.done.addCallback(self.done.append)
        self.plain, self.link = HalfCloseTransport(), HalfCloseTransport()
        self.relay.plain.makeConnection(self.plain)

    def end_both(self):
        self.relay.plain.connectionLost(Failure(ConnectionDone()))
        self.relay.link.connectionLost(Failure(ConnectionDone()))

    def test_plain_waits_paused_until_the_stream_opens(self):
        self.assertEqual(self.plain.producerState, "paused")
        self.relay.plain.dataReceived(b"early")
        self.relay.plain.dataReceived(b" bytes")
        self.assertEqual(self.link.value(), b"")
        self.relay.link.makeConnection(self.link)
        self.assertEqual(self.link.value(), b"early bytes")  # as they are: the stream frames them
        self.assertEqual(self.plain.producerState, "producing")
        self.assertIs(self.link.producer, self.plain)  # each side the other's producer
        self.assertIs(self.plain.producer, self.link)
        self.assertEqual(self.relay.bytes_to_link, 11)

    def test_plain_half_closed_before_the_stream_opens(self):
        self.relay.plain.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.relay.plain.readConnectionLost()
        self.assertFalse(self.link.write_closed)
        self.relay.link.makeConnection(self.link)
        self.assertEqual(self.link.value(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(self.link.write_closed)  # END_STREAM right behind the bytes
        self.assertIsNone(self.link.producer)  # nothing more to come from the plain side
        self.relay.link.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n")
        self.relay.link.readConnectionLost()
        self.assertEqual(self.plain.value(), b"HTTP/1.0 200 OK\r\n\r\n")
        self.assertTrue(self.plain.disconnecting and self.link.disconnecting)

    def test_half_close_each_way_then_clean_end(self):
        self.relay.link.makeConnection(self.link)
        self.relay.plain.dataReceived(b"request")
        self.relay.plain.readConnectionLost()  # the caller is done sending: END_STREAM
        self.assertEqual(self.link.value(), b"request")
        self.assertTrue(self.link.write_closed)
        self.assertFalse(self.link.disconnecting)  # the answer may still come
        self.relay.link.dataReceived(b"answer")
        self.relay.link.readConnectionLost()  # the far side's END_STREAM
        self.assertEqual(self.plain.value(), b"answer")
        self.assertTrue(self.plain.write_closed)
        self.assertTrue(self.plain.disconnecting and self.link.disconnecting)
        self.assertFalse(self.plain.aborted or self.link.aborted)
        self.end_both()
        self.assertEqual(self.done, [None])  # clean: no reason

    def test_far_side_half_closes_first_and_the_caller_still_sends(self):
        self.relay.link.makeConnection(self.link)
        self.relay.link.dataReceived(b"banner")
        self.relay.link.readConnectionLost()
        self.assertTrue(self.plain.write_closed)
        self.assertIsNone(self.plain.producer)  # unregistered, or the socket would never half-close
        self.assertFalse(self.plain.disconnecting)
        self.relay.plain.dataReceived(b"still talking")
        self.assertEqual(self.link.value(), b"still talking")
        self.relay.plain.readConnectionLost()
        self.assertTrue(self.link.write_closed)
        self.assertTrue(self.plain.disconnecting and self.link.disconnecting)
        self.end_both()
        self.assertEqual(self.done, [None])

    def test_a_stream_reset_aborts_the_plain_side_with_the_reason(self):
        self.relay.link.makeConnection(self.link)
        self.relay.link.dataReceived(b"half an ans")
        self.relay.link.connectionLost(Failure(StreamReset(0x8, "the peer reset the stream (CANCEL)")))
        self.assertTrue(self.plain.aborted)  # the caller sees a cut, not a clean end of a partial answer
        self.assertFalse(self.plain.write_closed)
        self.relay.plain.connectionLost(Failure(ConnectionLost()))
        self.assertIn("the peer reset the stream (CANCEL)", self.done[0])

    def test_the_link_lost_midway_aborts_the_plain_side(self):
        self.relay.link.makeConnection(self.link)
        self.relay.link.connectionLost(Failure(ConnectionLost("the link with x closed: no answer for 15 s")))
        self.assertTrue(self.plain.aborted)
        self.relay.plain.connectionLost(Failure(ConnectionLost()))
        self.assertIn("no answer for 15 s", self.done[0])

    def test_plain_lost_midway_resets_the_stream(self):
        self.relay.link.makeConnection(self.link)
        self.relay.plain.dataReceived(b"part")
        self.relay.plain.connectionLost(Failure(ConnectionLost("reset by peer")))
        self.assertTrue(self.link.aborted)  # RST_STREAM, not END_STREAM: the far side sees a cut
        self.assertFalse(self.link.write_closed)
        self.relay.link.connectionLost(Failure(ConnectionDone()))
        self.assertIn("reset by peer", self.done[0])

    def test_link_lost_after_the_far_end_of_stream_closes_gracefully(self):
        self.relay.link.makeConnection(self.link)
        self.relay.link.dataReceived(b"page")
        self.relay.link.readConnectionLost()
        self.relay.link.connectionLost(Failure(ConnectionLost("reset after END_STREAM")))
        self.assertEqual(self.plain.value(), b"page")
        self.assertTrue(self.plain.disconnecting)
        self.assertFalse(self.plain.aborted)  # what was sent is delivered

    def test_refuse_answers_without_a_link(self):
        self.relay.refuse(b"HTTP/1.1 404 Not Found\r\n\r\n", "404 nothing here")
        self.assertEqual(self.plain.value(), b"HTTP/1.1 404 Not Found\r\n\r\n")
        self.relay.plain.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.done, ["404 nothing here"])

    def test_caller_gone_before_the_stream_opened(self):
        self.relay.plain.dataReceived(b"never sent")
        self.relay.plain.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.done, ["the connection closed before the stream opened"])
        self.relay.link.makeConnection(self.link)  # the stream opens late
        self.assertTrue(self.link.aborted)  # reset at once
        self.assertEqual(self.link.value(), b"")


class RelayOnAStreamTests(SynchronousTestCase):
    """A relay answering a stream of a real ``MuxLink``; the peer is hand-written HTTP/2."""

    def setUp(self):
        self.relay = Relay("test")
        self.plain = HalfCloseTransport()
        self.relay.plain.makeConnection(self.plain)
        clock = Clock()
        self.asked = []
        self.link = MuxLink(PeerAddress("b" * 52, "a" * 52), False, lambda request: self.asked.append(request)
                            or self.relay.link, None, MuxSettings(), clock)
        self.peer = RawPeer()
        self.pump = iosim.connect(self.link, iosim.FakeTransport(self.link, True), self.peer,
                                  iosim.FakeTransport(self.peer, False), clock=clock)
        self.clock = clock

    def test_data_after_the_far_end_of_stream_never_reaches_the_plain_side(self):
        """Found by fuzzing the old framing: bytes after an end of stream were written to a
        half-closed socket. HTTP/2 makes them a stream error; the plain side keeps what came before."""
        self.peer.send(self.peer.headers(1, REQUEST), DataFrame(1, b"page", flags=["END_STREAM"]))
        self.pump.flush()
        self.clock.advance(0)  # the responder is asked in the next reactor turn
        self.pump.flush()
        self.peer.send(DataFrame(1, b"late"), DataFrame(1, b"later"), preface=False)
        self.pump.flush()
        self.clock.advance(0)
        self.assertEqual(self.plain.value(), b"page")
        self.assertTrue(self.plain.write_closed)
        self.assertFalse(self.link._gone)  # one stream's error, not the link's
        self.assertEqual(self.link.streams, {})

    def test_a_stream_reset_as_it_is_requested_is_never_answered(self):
        """HEADERS and RST_STREAM in one read: the responder is never asked, so nothing (an
        upstream connection, a process) is made for a stream that is gone."""
        self.peer.send(self.peer.headers(1, REQUEST), RstStreamFrame(1, error_code=ErrorCodes.CANCEL))
        self.pump.flush()
        self.clock.advance(0)
        self.assertEqual(self.asked, [])
        self.assertEqual(self.link.streams, {})
        self.assertFalse(self.link._gone)
