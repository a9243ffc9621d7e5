"""The peer link over real loopback sockets: pinning, SNI routing, dialing, Hello."""

from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from malai.identity import Identity
from malai.p2p.dial import AddressBook, Dialer, DialError
from malai.p2p.link import WrongPeer, server_factory
from malai.p2p.tls import ALPN, PeerTLS, make_certificate
from malai.peer.commands import IncompatibleVersion, Ping
from malai.peer.links import LinkPool, link_factory
from malai.peer.protocol import HelloInfo, PeerAMPFactory


class Server:
    """A listening side holding some identities, accepting a set of peers."""

    def __init__(self, testcase, identities, allowed, hello=HelloInfo(), port=0):
        self.identities = identities
        self.allowed = set(allowed)
        self.seen = []
        self.routed = defer.Deferred()
        self.links = []
        self.factory = link_factory(PeerAMPFactory(hello, dialer=False))
        self.tls = PeerTLS(identities)
        self.testcase = testcase
        self.listen(port)

    def route(self, addr):
        self.seen.append(addr)
        if not self.routed.called:
            self.routed.callback(addr)
        if addr.peer not in self.allowed:
            return None
        link = self.factory.buildProtocol(addr)
        self.links.append(link)
        return link

    def listen(self, port=0):
        self.port = reactor.listenTCP(port, server_factory(self.tls, self.route), interface="127.0.0.1")
        self.testcase.addCleanup(self.stop)
        self.addr = f"127.0.0.1:{self.port.getHost().port}"

    def stop(self):
        for link in self.links:
            if not link.closed.called:
                link.transport.abortConnection()
        self.links = []
        return self.port.stopListening()


class LinkTests(TestCase):
    def setUp(self):
        self.client = Identity.generate()
        self.server = Identity.generate()
        self.dialer = Dialer(reactor, PeerTLS(), AddressBook(), timeout=5)
        self.pool = LinkPool(self.dialer, link_factory(PeerAMPFactory(HelloInfo(), dialer=True)))
        self.addCleanup(lambda: self.pool.close())

    @defer.inlineCallbacks
    def test_pinned_both_ways_and_ping(self):
        server = Server(self, [self.server], [self.client.id52])
        link = yield self.pool.get(self.client, self.server.id52, [server.addr])
        self.assertEqual(link.peer.peer, self.server.id52)
        self.assertEqual(link.peer.local, self.client.id52)
        self.assertEqual(link.peer.hint, f"tcp:{server.addr}")
        [seen] = server.seen
        self.assertEqual((seen.local, seen.peer), (self.server.id52, self.client.id52))
        answer = yield link.callRemote(Ping, payload=b"hi")
        self.assertEqual(answer["payload"], b"hi")
        # the pool reuses the link
        again = yield self.pool.get(self.client, self.server.id52)
        self.assertIs(again, link)
        self.assertEqual(len(server.seen), 1)

    @defer.inlineCallbacks
    def test_server_presenting_another_key_is_refused(self):
        impostor = Identity.generate()
        key, cert = make_certificate(impostor)
        options = CertificateOptions(privateKey=key, certificate=cert, raiseMinimumTo=TLSVersion.TLSv1_3,
                                     acceptableProtocols=[ALPN])
        got = []

        class Recorder(Protocol):
            def dataReceived(self, data):
                got.append(data)

        port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, Factory.forProtocol(Recorder)),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        e = yield self.assertFailure(
            self.pool.get(self.client, self.server.id52, [f"127.0.0.1:{port.getHost().port}"]), WrongPeer)
        self.assertIn(f"expected {self.server.id52}, the peer presented {impostor.id52}", str(e))
        self.assertEqual(got, [])

    @defer.inlineCallbacks
    def test_server_with_a_non_ed25519_certificate_is_refused(self):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.server.id52)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        options = CertificateOptions(privateKey=key, certificate=cert, raiseMinimumTo=TLSVersion.TLSv1_3)
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, Factory.forProtocol(Protocol)),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # Refused during the handshake: by our verifier (not ed25519) or earlier, when
        # OpenSSL finds no signature algorithm both sides accept.
        e = yield self.assertFailure(
            self.pool.get(self.client, self.server.id52, [f"127.0.0.1:{port.getHost().port}"]), WrongPeer, DialError)
        self.assertTrue("not ed25519" in str(e) or "TLS handshake" in str(e), str(e))

    @defer.inlineCallbacks
    def test_unknown_client_closed_after_handshake(self):
        server = Server(self, [self.server], allowed=[])
        e = yield self.assertFailure(self.pool.get(self.client, self.server.id52, [server.addr]), Exception)
        self.assertEqual([a.peer for a in server.seen], [self.client.id52])
        self.assertEqual(server.links, [])
        self.assertNotIsInstance(e, WrongPeer)

    @defer.inlineCallbacks
    def test_client_without_certificate_refused(self):
        server = Server(self, [self.server], [self.client.id52])
        got, lost = [], defer.Deferred()

        class Probe(Protocol):
            def connectionMade(self):
                self.transport.write(b"hello?")

            def dataReceived(self, data):
                got.append(data)

            def connectionLost(self, reason):
                lost.callback(reason.getErrorMessage())

        @implementer(IOpenSSLClientConnectionCreator)
        class NoCertificate:
            def clientConnectionForTLS(self, tls):
                ctx = SSL.Context(SSL.TLS_METHOD)
                ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
                conn = SSL.Connection(ctx, None)
                conn.set_tlsext_host_name(server_id52.encode())
                return conn

        server_id52 = self.server.id52
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port.getHost().port)
        yield wrapClientTLS(NoCertificate(), endpoint).connect(Factory.forProtocol(Probe))
        reason = yield lost
        self.assertIn("certificate required", reason)
        self.assertEqual(got, [])
        self.assertEqual(server.seen, [])  # never reached the router

    @defer.inlineCallbacks
    def test_sni_routes_between_identities(self):
        other = Identity.generate()
        server = Server(self, [self.server, other], [self.client.id52])
        a = yield self.pool.get(self.client, self.server.id52, [server.addr])
        b = yield self.pool.get(self.client, other.id52, [server.addr])
        self.assertIsNot(a, b)
        self.assertEqual([s.local for s in server.seen], [self.server.id52, other.id52])
        self.assertEqual(b.peer.peer, other.id52)

    @defer.inlineCallbacks
    def test_identity_not_held_by_listener(self):
        server = Server(self, [self.server], [self.client.id52])
        absent = Identity.generate().id52
        e = yield self.assertFailure(self.pool.get(self.client, absent, [server.addr]), DialError)
        self.assertIn(f"does not hold identity {absent}", str(e))

    @defer.inlineCallbacks
    def test_dead_first_address_skipped(self):
        server = Server(self, [self.server], [self.client.id52])
        dead = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        dead_addr = f"127.0.0.1:{dead.getHost().port}"
        yield dead.stopListening()
        link = yield self.pool.get(self.client, self.server.id52, [dead_addr, server.addr])
        self.assertEqual(link.peer.hint, f"tcp:{server.addr}")
        self.assertEqual(self.dialer.book.hints(self.server.id52)[0], f"tcp:{server.addr}")

    @defer.inlineCallbacks
    def test_no_address_and_all_dead(self):
        e = yield self.assertFailure(self.pool.get(self.client, self.server.id52), DialError)
        self.assertIn("no known address", str(e))
        dead = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        port = dead.getHost().port
        yield dead.stopListening()
        e = yield self.assertFailure(self.pool.get(self.client, self.server.id52, [f"127.0.0.1:{port}"]), DialError)
        self.assertIn(f"cannot reach {self.server.id52}: tried tcp:127.0.0.1:{port}: ", str(e))
        self.assertIn("refused", str(e))

    @defer.inlineCallbacks
    def test_redial_after_peer_restart(self):
        server = Server(self, [self.server], [self.client.id52])
        first = yield self.pool.get(self.client, self.server.id52, [server.addr])
        port = server.port.getHost().port
        yield server.stop()
        yield first.closed
        server.listen(port)
        second = yield self.pool.get(self.client, self.server.id52)
        self.assertIsNot(first, second)
        answer = yield second.callRemote(Ping, payload=b"again")
        self.assertEqual(answer["payload"], b"again")

    @defer.inlineCallbacks
    def test_hello_version_mismatch_refused_both_sides(self):
        server = Server(self, [self.server], [self.client.id52], hello=HelloInfo(protocol=99))
        e = yield self.assertFailure(self.pool.get(self.client, self.server.id52, [server.addr]), IncompatibleVersion)
        self.assertIn("the peer speaks version 99, this side 2", str(e))
        [link] = server.links
        yield link.ready
        e = yield self.assertFailure(link.control.ready, IncompatibleVersion)
        self.assertIn("the peer speaks version 2, this side 99", str(e))
        yield link.closed


class EndpointStringTests(TestCase):
    @defer.inlineCallbacks
    def test_malai_endpoint_string(self):
        from twisted.internet.endpoints import clientFromString

        client, server_id = Identity.generate(), Identity.generate()
        server = Server(self, [server_id], [client.id52])
        keyfile = self.mktemp()
        client.save(keyfile)
        addrs, lost = [], defer.Deferred()

        class Recording(Factory):
            def buildProtocol(self, addr):
                addrs.append(addr)
                proto = Protocol()
                proto.connectionLost = lambda reason: lost.callback(None)
                return proto

        escaped = server.addr.replace(":", "\\:")
        endpoint = clientFromString(reactor, f"malai:{server_id.id52}:key={keyfile}:addrs={escaped}")
        proto = yield endpoint.connect(Recording())
        self.assertEqual((addrs[0].local, addrs[0].peer), (client.id52, server_id.id52))
        routed = yield server.routed
        self.assertEqual(routed.peer, client.id52)
        proto.transport.loseConnection()
        yield lost
