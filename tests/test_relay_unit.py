"""The relay's framing and half-close logic, with Twisted's string transports."""

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from malai import frames
from malai.peer.relay import Relay


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

    def test_plain_waits_paused_until_the_link_is_there(self):
        self.assertEqual(self.plain.producerState, "paused")
        self.relay.plain.dataReceived(b"early")
        self.relay.link.makeConnection(self.link)
        self.assertEqual(self.link.value(), frames.encode(frames.DATA, b"early"))
        self.assertEqual(self.plain.producerState, "producing")
        self.assertIs(self.link.producer, self.plain)  # each side the other's producer
        self.assertIs(self.plain.producer, self.link)

    def test_half_close_each_way_then_clean_end(self):
        self.relay.link.makeConnection(self.link)
        self.relay.plain.dataReceived(b"request")
        self.relay.plain.readConnectionLost()  # the caller is done sending
        self.assertEqual(self.link.value(), frames.encode(frames.DATA, b"request") + frames.encode(frames.EOF))
        self.assertFalse(self.link.disconnecting)  # the answer may still come
        self.relay.link.dataReceived(frames.encode(frames.DATA, b"answer") + frames.encode(frames.EOF))
        self.assertEqual(self.plain.value(), b"answer")
        self.assertTrue(self.plain.write_closed)
        self.assertTrue(self.plain.disconnecting and self.link.disconnecting)
        self.relay.plain.connectionLost(Failure(ConnectionDone()))
        self.relay.link.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.done, [None])  # clean: no reason

    def test_far_error_aborts_the_plain_side_with_the_reason(self):
        self.relay.link.makeConnection(self.link)
        self.relay.link.dataReceived(frames.encode(frames.ERROR, b"upstream reset"))
        self.assertTrue(self.plain.aborted)
        self.relay.plain.connectionLost(Failure(ConnectionLost()))
        self.relay.link.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.done, ["the far side: upstream reset"])

    def test_plain_lost_midway_tells_the_far_side(self):
        self.relay.link.makeConnection(self.link)
        self.relay.plain.connectionLost(Failure(ConnectionLost("reset by peer")))
        parsed = list(frames.FrameParser().feed(self.link.value()))
        self.assertEqual(parsed[-1][0], frames.ERROR)
        self.assertTrue(self.link.disconnecting)

    def test_link_lost_after_the_far_eof_closes_gracefully(self):
        self.relay.link.makeConnection(self.link)
        self.relay.link.dataReceived(frames.encode(frames.DATA, b"page") + frames.encode(frames.EOF))
        self.relay.link.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.plain.value(), b"page")
        self.assertTrue(self.plain.disconnecting)
        self.assertFalse(self.plain.aborted)  # what was sent is delivered

    def test_refuse_answers_without_a_link(self):
        self.relay.refuse(b"HTTP/1.1 404 Not Found\r\n\r\n", "404 nothing here")
        self.assertEqual(self.plain.value(), b"HTTP/1.1 404 Not Found\r\n\r\n")
        self.relay.plain.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.done, ["404 nothing here"])

    def test_bad_frame_fails_both(self):
        self.relay.link.makeConnection(self.link)
        self.relay.link.dataReceived(b"Z\xff\xff\xff\xff")
        self.assertTrue(self.plain.aborted)
        self.assertTrue(self.link.disconnecting)

    def test_data_after_the_far_eof_cuts_the_stream(self):
        """Found by fuzzing: bytes after an end of stream were written to a half-closed socket."""
        self.relay.link.makeConnection(self.link)
        self.relay.link.dataReceived(frames.encode(frames.EOF) + frames.encode(frames.DATA, b"late")
                                     + frames.encode(frames.DATA, b"later"))
        self.assertEqual(self.plain.value(), b"")
        self.assertTrue(self.plain.aborted)
        self.assertTrue(self.link.disconnecting)
