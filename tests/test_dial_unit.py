"""Dialer race and link idle timeout, with Twisted's fakes."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from malai.identity import Identity
from malai.p2p.dial import AddressBook, Dialer, DialError, advertised_hint
from malai.p2p.link import PeerAddress, WrongPeer
from malai.p2p.tls import PeerTLS
from malai.peer.commands import Ping
from malai.peer.protocol import HelloInfo, PeerAMP, PeerAMPFactory


class FakeEndpoint:
    def __init__(self, log, hint):
        self.log, self.hint = log, hint

    def connect(self, factory):
        d = Deferred(lambda d: self.log.append(("cancelled", self.hint)))
        self.log.append(("connect", self.hint, d))
        return d


class DialerRaceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.log = []
        self.dialer = Dialer(self.clock, PeerTLS(), AddressBook(), stagger=0.25, timeout=10,
                             endpoint_for=lambda reactor, hint, timeout: FakeEndpoint(self.log, hint))
        self.me, self.peer = Identity.generate(), Identity.generate().id52

    def started(self):
        return [entry[1] for entry in self.log if entry[0] == "connect"]

    def test_staggered_attempts_then_timeout(self):
        d = self.dialer.connect(self.me, self.peer, PeerAMPFactory(HelloInfo(), True),
                                ["127.0.0.1:1", "127.0.0.2:2", "127.0.0.3:3"])
        self.assertEqual(self.started(), ["tcp:127.0.0.1:1"])
        self.clock.advance(0.25)
        self.assertEqual(len(self.started()), 2)
        self.clock.advance(0.25)
        self.assertEqual(len(self.started()), 3)
        self.assertNoResult(d)
        self.clock.advance(10)
        e = self.failureResultOf(d, DialError).value
        self.assertIn(f"cannot reach {self.peer}: tried", str(e))
        for hint in ("tcp:127.0.0.1:1", "tcp:127.0.0.2:2", "tcp:127.0.0.3:3"):
            self.assertIn(f"{hint}: no answer within 10s", str(e))
            self.assertIn(("cancelled", hint), self.log)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_relay_hint_last_and_later(self):
        self.dialer.kinds["relay"] = lambda local, peer, hint: FakeEndpoint(self.log, hint)
        d = self.dialer.connect(self.me, self.peer, PeerAMPFactory(HelloInfo(), True), ["relay:R", "a:1"])
        self.assertEqual(self.started(), ["tcp:a:1"])  # direct first, whatever the order given
        self.clock.advance(0.5)
        self.assertEqual(self.started(), ["tcp:a:1"])  # a relay waits longer than the stagger…
        self.clock.advance(0.5)
        self.assertEqual(self.started(), ["tcp:a:1", "relay:R"])
        self.log[0][2].errback(Failure(ConnectionRefusedError("refused")))
        self.assertNoResult(d)
        d.cancel()
        self.assertIn(("cancelled", "relay:R"), self.log)
        self.failureResultOf(d)

    def test_relay_at_once_when_direct_fails(self):
        self.dialer.kinds["relay"] = lambda local, peer, hint: FakeEndpoint(self.log, hint)
        self.dialer.connect(self.me, self.peer, PeerAMPFactory(HelloInfo(), True), ["a:1", "relay:R"])
        self.log[0][2].errback(Failure(ConnectionRefusedError("refused")))
        self.assertEqual(self.started(), ["tcp:a:1", "relay:R"])  # …unless the direct attempt failed

    def test_failure_starts_next_at_once(self):
        d = self.dialer.connect(self.me, self.peer, PeerAMPFactory(HelloInfo(), True), ["a:1", "b:2"])
        self.log[0][2].errback(Failure(ConnectionRefusedError("refused")))
        self.assertEqual(self.started(), ["tcp:a:1", "tcp:b:2"])
        self.assertNoResult(d)
        self.log[1][2].errback(Failure(ConnectionRefusedError("refused")))
        e = self.failureResultOf(d, DialError).value
        self.assertIn("tcp:a:1: refused; tcp:b:2: refused", str(e))

    def test_wrong_peer_ends_the_race(self):
        d = self.dialer.connect(self.me, self.peer, PeerAMPFactory(HelloInfo(), True), ["a:1", "b:2"])
        self.clock.advance(0.25)
        self.log[0][2].errback(Failure(WrongPeer("expected x, the peer presented y")))
        self.failureResultOf(d, WrongPeer)
        self.assertIn(("cancelled", "tcp:b:2"), self.log)

    def test_bad_hint(self):
        dialer = Dialer(self.clock, PeerTLS(), AddressBook())
        d = dialer.connect(self.me, self.peer, PeerAMPFactory(HelloInfo(), True), ["tcp:nohostport"])
        self.assertIn("expected tcp:HOST:PORT", str(self.failureResultOf(d, DialError).value))

    def test_advertised_hint(self):
        self.assertEqual(advertised_hint("0.0.0.0:7420", "192.0.2.5"), "tcp:192.0.2.5:7420")
        self.assertEqual(advertised_hint("[::]:7420", "2001:db8::1"), "tcp:[2001:db8::1]:7420")
        self.assertEqual(advertised_hint("127.0.0.1:7421", "127.0.0.2"), "tcp:127.0.0.1:7421")

    def test_address_book_order(self):
        book = AddressBook()
        book.configure("p", ["10.0.0.1:1", "tcp:10.0.0.2:2"])
        book.learn("p", "10.0.0.2:2")
        book.learn("p", "10.0.0.3:3")
        self.assertEqual(book.hints("p"), ["tcp:10.0.0.3:3", "tcp:10.0.0.2:2", "tcp:10.0.0.1:1"])


class IdleTimeoutTests(SynchronousTestCase):
    def test_idle_link_closes_activity_keeps_it(self):
        clock = Clock()
        link = PeerAMP(PeerAddress("a", "b"), HelloInfo(), dialer=False, idle_timeout=60, clock=clock)
        transport = StringTransport()
        link.makeConnection(transport)
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        link.callRemote(Ping, payload=b"x")
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_commands_before_hello_are_refused(self):
        link = PeerAMP(PeerAddress("a", "b"), HelloInfo(), dialer=False, responder=amp.CommandLocator())
        link.makeConnection(StringTransport())
        self.assertIsNone(link.locateResponder(Ping.commandName))
        self.assertIsNotNone(link.locateResponder(b"Hello"))
