"""The peer link layer under attack, crash and load: bounded boxes, handshake deadlines,
one log line per offending link, a stop that always stops, a lost manager noticed at once.

Real daemons where the item crosses a process (attacks with raw TLS and TCP sockets);
Twisted's fakes for the protocol logic and the timers."""

import os
import signal
import socket
import ssl
import struct
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import AlreadyCalledError, CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.ampbox import decode_box, encode_box
from malai.identity import Identity
from malai.p2p.dial import DialError
from malai.p2p.link import HANDSHAKE_TIMEOUT, MAX_PENDING_PER_SOURCE, PeerAddress, connect_verified, server_factory
from malai.p2p.tls import ALPN, PeerTLS, make_certificate
from malai.peer.links import MAX_DIALS_PER_PEER, LinkPool, SpareLinks
from malai.peer.protocol import MAX_BOX_BYTES, MAX_BOX_KEYS, HelloInfo, PeerAMP
from malai.services.keeper import RETRY_FIRST, LinkKeeper
from tests.helpers import DaemonHome, free_port, is_dead, wait_for


# -- attack tools -------------------------------------------------------------------------
def tls_context(identity: Identity, folder: Path) -> ssl.SSLContext:
    """A client context presenting ``identity`` (no check of the server: the attacker's side)."""
    key, cert = make_certificate(identity)
    (folder / "key.pem").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    ctx.set_alpn_protocols([ALPN.decode()])
    return ctx


class RawTLS:
    """A blocking TLS client over memory BIOs: what goes on the wire, record by record, is ours."""

    def __init__(self, ctx: ssl.SSLContext, addr: str, server_id52: str, timeout: float = 5.0,
                 source: str = ""):
        host, _, port = addr.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout, source_address=(source, 0))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_id52)
        self.buffer = bytearray()
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._pull()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _pull(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the daemon")
        self.incoming.write(data)

    def send(self, *records: bytes) -> None:
        """Each argument one TLS record, all in one write."""
        for record in records:
            self.tls.write(record)
        self._flush()

    def box(self) -> dict:
        while True:
            decoded = decode_box(bytes(self.buffer))
            if decoded is not None:
                box, used = decoded
                del self.buffer[:used]
                return box
            try:
                self.buffer += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                self._pull()

    def hello(self) -> dict:
        self.send(hello_box())
        return self.box()

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        return closed(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()


def hello_box() -> bytes:
    return encode_box({b"_command": b"Hello", b"_ask": b"1", b"protocol": b"1", b"features": b"",
                       b"version": b"attacker", b"addrs": b""})


def big_box_strings(total: int):
    """Pieces of one AMP box with 60 KB values under distinct keys, ``total`` bytes in all (no end)."""
    value = b"x" * 60000
    piece = struct.pack(">H", 8) + b"%08d" + struct.pack(">H", len(value)) + value
    for i in range(total // len(piece)):
        yield piece.replace(b"%08d", b"%08d" % i)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Manager:
    """A manager daemon of cluster ``company``; ``mallory`` is a member with no rights."""

    def __init__(self, testcase, *daemon_args: str):
        self.home = DaemonHome(testcase)
        out = self.home.ok("cluster", "init", "company")
        self.id52 = out.split("manager ID52: ")[1].split()[0]
        self.mallory = Identity.generate()
        config = self.home.root / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + f'\n[machine.mallory]\nid52 = "{self.mallory.id52}"\n')
        self.home.ok("daemon", "--listen", "tcp:0:interface=127.0.0.1", *daemon_args)
        self.addr = self.home.peer_addr()
        self.pid = self.home.pid()
        folder = Path(tempfile.mkdtemp(dir=self.home.root))
        self.ctx = tls_context(self.mallory, folder)

    def link(self) -> RawTLS:
        """A verified link as mallory, past Hello."""
        raw = RawTLS(self.ctx, self.addr, self.id52)
        answer = raw.hello()
        assert answer.get(b"_answer") == b"1", answer
        return raw

    def log(self) -> str:
        return (self.home.root / "log" / "malai.log").read_text(errors="replace")

    def control(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.home.root / "malai.socket"))
        return s


def send_until_closed(send, pieces) -> int:
    """Send ``pieces`` until the daemon closes the connection; the bytes sent."""
    sent = 0
    try:
        for piece in pieces:
            send(piece)
            sent += len(piece)
    except OSError:  # reset or broken pipe: the daemon closed it
        pass
    return sent


def refusals(log: str) -> list:
    return [line for line in log.splitlines() if "closing the link" in line or "closing a control connection" in line]


# -- real daemons ---------------------------------------------------------------------------
class BoxLimitTests(TestCase):
    """A member with no rights, and a local user, cannot make the daemon buffer a huge box."""

    def setUp(self):
        self.m = Manager(self)

    def test_huge_box_on_a_peer_link_closes_it(self):
        before = rss_kib(self.m.pid)
        raw = self.m.link()
        total = 96 * 1024 * 1024
        sent = send_until_closed(lambda piece: raw.send(piece), big_box_strings(total))
        self.assertTrue(raw.closed_by_peer(), "the link stayed open")
        self.assertLess(sent, total)
        grown = (rss_kib(self.m.pid) - before) // 1024
        self.assertLess(grown, 32, f"the daemon grew by {grown} MB")
        wait_for(lambda: refusals(self.m.log()), what="a log line")
        log = self.m.log()
        self.assertEqual(len(refusals(log)), 1, refusals(log))
        self.assertIn(self.m.mallory.id52, refusals(log)[0])
        self.assertNotIn("Traceback", log)
        self.m.link().close()  # still serving

    def test_box_of_many_small_keys_closes_the_link(self):
        raw = self.m.link()
        keys = b"".join(struct.pack(">H", 4) + b"%04x" % i + b"\x00\x00" for i in range(65536))
        send_until_closed(lambda piece: raw.send(piece), (keys[i:i + 16384] for i in range(0, len(keys), 16384)))
        self.assertTrue(raw.closed_by_peer(), "the link stayed open")
        wait_for(lambda: refusals(self.m.log()), what="a log line")
        self.assertIn(f"{MAX_BOX_KEYS} keys", refusals(self.m.log())[0])

    def test_huge_box_on_the_control_socket_closes_it(self):
        before = rss_kib(self.m.pid)
        s = self.m.control()
        total = 96 * 1024 * 1024
        sent = send_until_closed(s.sendall, big_box_strings(total))
        self.assertTrue(closed(s, 5), "the connection stayed open")
        self.assertLess(sent, total)
        grown = (rss_kib(self.m.pid) - before) // 1024
        self.assertLess(grown, 32, f"the daemon grew by {grown} MB")
        self.assertEqual(self.m.home.status()["state"], "RUNNING")


class MalformedBoxTests(TestCase):
    """Malformed boxes cost one log line per link, which then closes; others are served."""

    def setUp(self):
        self.m = Manager(self)

    def test_one_line_per_offending_peer_link(self):
        malformed = [
            encode_box({b"foo": b"bar"}),  # neither command nor answer
            encode_box({b"_answer": b"999", b"x": b""}),  # answers nothing asked
            encode_box({b"_error": b"999"}),  # an error without code
            encode_box({b"_command": b"Hello", b"_ask": b"2", b"protocol": b"one", b"features": b"",
                        b"version": b"", b"addrs": b""}),  # an integer that is not
            encode_box({b"_command": b"Ping", b"_ask": b"3"}),  # a missing argument
        ]
        links = 10
        for i in range(links):
            raw = self.m.link()
            raw.send(*(malformed[i % len(malformed)] for _ in range(200)))
            self.assertTrue(raw.closed_by_peer(), f"link {i} stayed open")
        wait_for(lambda: len(refusals(self.m.log())) >= links, what="a line per link")
        log = self.m.log()
        self.assertEqual(len(refusals(log)), links, "\n".join(refusals(log)))
        self.assertNotIn("Traceback", log)
        self.m.link().close()
        self.assertEqual(self.m.home.status()["state"], "RUNNING")

    def test_one_line_per_offending_control_connection(self):
        for _ in range(5):
            s = self.m.control()
            s.sendall(encode_box({b"foo": b"bar"}) * 200 + encode_box({b"_command": b"Status"}) * 200)
            self.assertTrue(closed(s, 5))
            s.close()
        wait_for(lambda: len(refusals(self.m.log())) >= 5, what="a line per connection")
        log = self.m.log()
        self.assertEqual(len(refusals(log)), 5, "\n".join(refusals(log)))
        self.assertNotIn("Traceback", log)
        self.assertEqual(self.m.home.status()["state"], "RUNNING")


class StopTests(TestCase):
    def test_stop_after_a_box_that_fails_while_the_link_closes(self):
        """A malformed box still in TLS's buffer when the link drops used to keep the
        link's ``closed`` from firing, and ``malai stop`` waited forever."""
        m = Manager(self)
        raw = m.link()  # the pooled link to mallory
        time.sleep(0.3)
        raw.send(encode_box({b"foo": b"bar"}), b"\x00")  # two records in one segment
        self.assertTrue(raw.closed_by_peer())
        start = time.monotonic()
        r = m.home.malai("stop", "--timeout", "20")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertLess(time.monotonic() - start, 15)
        self.assertTrue(is_dead(m.pid))

    def test_stop_is_bounded_when_a_peer_never_answers(self):
        m = Manager(self)
        held = [m.link() for _ in range(3)]  # never read, never send close_notify
        self.addCleanup(lambda: [raw.close() for raw in held])
        start = time.monotonic()
        r = m.home.malai("stop", "--timeout", "30")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertLess(time.monotonic() - start, 15)
        self.assertIn("aborting", m.log())


def client_hello(addr: str, server_id52: str) -> socket.socket:
    """A TCP connection that sent a TLS ClientHello and will say nothing more."""
    host, _, port = addr.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_id52)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    try:
        sock.sendall(outgoing.read())
    except (ConnectionResetError, BrokenPipeError):
        pass  # over the cap: closed at once
    return sock


class HandshakeTests(TestCase):
    def test_silent_and_half_handshaken_connections_are_closed(self):
        m = Manager(self)
        before = fd_count(m.pid)
        host, _, port = m.addr.rpartition(":")
        socks = [socket.create_connection((host, int(port))) for _ in range(150)]
        socks += [client_hello(m.addr, m.id52) for _ in range(150)]
        self.addCleanup(lambda: [s.close() for s in socks])
        start = time.monotonic()
        time.sleep(1)
        held = fd_count(m.pid) - before
        self.assertLessEqual(held, MAX_PENDING_PER_SOURCE + 2, f"{held} pending handshakes from one address")
        RawTLS(m.ctx, m.addr, m.id52, source="127.0.0.2").close()  # another address still gets in
        wait_for(lambda: fd_count(m.pid) <= before + 1, 15, "the pending handshakes to be closed")
        self.assertLess(time.monotonic() - start, 12.5)
        self.assertTrue(all(closed(s) for s in socks))


def closed(sock: socket.socket, timeout: float = 1.0) -> bool:
    """Whether the daemon closes ``sock`` within ``timeout`` (reading what it sends)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class RelinkTests(TestCase):
    def test_machine_relinks_within_5s_of_its_managers_return(self):
        """After ``kill -9`` of the manager, a machine the manager cannot dial (no addrs)
        notices the loss at once, logs it and re-dials with backoff."""
        cm, web01 = DaemonHome(self), DaemonHome(self)
        cm_id52 = cm.ok("cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        listen = f"tcp:{free_port()}:interface=127.0.0.1"
        cm.start(listen)
        out = web01.ok("machine", "init", cm_id52, "company", "--addr", cm.peer_addr(), "--name", "web01")
        web01_id52 = out.split("machine ID52: ")[1].split()[0]
        config = cm.root / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + f'\n[machine.web01]\nid52 = "{web01_id52}"\n')
        cm.ok("rescan")
        web01.start()

        def linked() -> bool:
            return any(link["path"].startswith("tcp:") for link in web01.status()["clusters"][0]["peer_links"])

        wait_for(linked, 15, "web01 to link to its manager")
        pid = cm.pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: is_dead(pid), what="the manager to die")
        wait_for(lambda: not linked(), 5, "web01 to notice")
        time.sleep(1.5)  # an outage: web01's first re-dials fail
        cm.start(listen)
        back = time.monotonic()
        wait_for(linked, 10, "web01 to link again")
        self.assertLess(time.monotonic() - back, 5)
        log = (web01.root / "log" / "malai.log").read_text()
        self.assertIn("company: lost the link to the manager", log)


class LogRotationTests(TestCase):
    def test_rotated_logs_stay_within_their_cap(self):
        home = DaemonHome(self)
        home.ok("cluster", "init", "company")
        home.ok("daemon", "--listen", "tcp:0:interface=127.0.0.1", "--log-size", "20000", "--log-files", "2")
        host, _, port = home.peer_addr().rpartition(":")
        for _ in range(600):  # each costs the daemon a line: "refused a link: …"
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
                closed(s)
        home.ok("stop")
        logs = sorted(p.name for p in (home.root / "log").iterdir() if p.name.startswith("malai.log"))
        self.assertEqual(logs, ["malai.log", "malai.log.1", "malai.log.2"])
        for name in logs:
            self.assertLess((home.root / "log" / name).stat().st_size, 20000 + 1000)


# -- unit tests under fakes -------------------------------------------------------------------
def open_link(clock=None) -> tuple:
    """An accepted ``PeerAMP`` past Hello, on a string transport."""
    link = PeerAMP(PeerAddress("me", "peer-id52"), HelloInfo(), dialer=False, clock=clock or Clock())
    transport = StringTransport()
    link.makeConnection(transport)
    link.peer_hello = {"protocol": 1}
    return link, transport


def warnings_in(events) -> list:
    return [e for e in events if e["log_level"] >= LogLevel.warn]


class BoxLimitUnitTests(SynchronousTestCase):
    def feed(self, link, data: bytes, step: int = 65536) -> None:
        for i in range(0, len(data), step):
            link.dataReceived(data[i:i + step])

    def test_a_box_past_the_byte_limit_aborts_the_link(self):
        link, transport = open_link()
        with capturedLogs() as events:
            self.feed(link, b"".join(big_box_strings(MAX_BOX_BYTES + 2 * 65536)))
            self.feed(link, b"".join(big_box_strings(8 * 65536)))  # ignored
        self.assertTrue(transport.disconnected)
        self.assertLess(len(link._unprocessed), 2 * 65536)
        [warning] = warnings_in(events)
        self.assertIn("closing the link with peer-id52: a box over", warning["log_format"].format(**warning))

    def test_a_box_past_the_key_limit_aborts_the_link(self):
        link, transport = open_link()
        self.feed(link, b"".join(struct.pack(">H", 4) + b"%04x" % i + b"\x00\x00" for i in range(MAX_BOX_KEYS + 1)))
        self.assertTrue(transport.disconnected)

    def test_a_box_within_the_limits_is_answered(self):
        link, transport = open_link()
        filler = {b"f%03d" % i: b"x" * 60000 for i in range(MAX_BOX_BYTES // 60100 - 1)}
        box = encode_box({b"_command": b"Ping", b"_ask": b"7", b"payload": b"hi", **filler})
        self.assertLess(len(box), MAX_BOX_BYTES)
        self.feed(link, box * 2)
        self.assertFalse(transport.disconnected)
        answers = []
        data = transport.value()
        while data:
            answer, used = decode_box(data)
            answers.append(answer)
            data = data[used:]
        self.assertEqual([a[b"_answer"] for a in answers], [b"7", b"7"])


class MalformedBoxUnitTests(SynchronousTestCase):
    MALFORMED = {
        "no command": encode_box({b"foo": b"bar"}),
        "unknown answer": encode_box({b"_answer": b"99"}),
        "error without code": encode_box({b"_error": b"99"}),
        "bad integer": encode_box({b"_command": b"Hello", b"_ask": b"1", b"protocol": b"x", b"features": b"",
                                   b"version": b"", b"addrs": b""}),
        "missing argument": encode_box({b"_command": b"Ping", b"_ask": b"1"}),
        "long key": struct.pack(">H", 300) + b"k" * 300,
        "empty box": b"\x00\x00",
    }

    def test_one_warning_per_link_then_closed(self):
        for name, box in self.MALFORMED.items():
            clock = Clock()
            link, transport = open_link(clock)
            with capturedLogs() as events:
                link.dataReceived(box * 100)
                clock.advance(1)
            self.assertTrue(transport.disconnected, name)
            self.assertEqual(len(warnings_in(events)), 1, name)
            self.assertEqual([e for e in events if e.get("log_failure")], [], name)  # no traceback
            link.connectionLost(Failure(ConnectionAborted()))
            self.assertTrue(link.closed.called, name)

    def test_a_command_that_fails_is_answered_then_closed(self):
        clock = Clock()
        link, transport = open_link(clock)
        link.dataReceived(self.MALFORMED["bad integer"] * 3)
        answer, _ = decode_box(transport.value())
        self.assertEqual((answer[b"_error"], answer[b"_error_code"]), (b"1", b"UNKNOWN"))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        clock.advance(1)  # a peer that never completes the close
        self.assertTrue(transport.disconnected)

    def test_closed_fires_when_the_inner_protocol_fails(self):
        class Broken:
            def connectionLost(self, reason):
                raise RuntimeError("broken")

        link, _ = open_link()
        link.innerProtocol = Broken()
        self.assertRaises(RuntimeError, link.connectionLost, Failure(ConnectionDone()))
        self.assertIs(self.successResultOf(link.closed), link)


class HandshakeDeadlineUnitTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.factory = server_factory(PeerTLS([Identity.generate()]), lambda addr: None, self.clock, per_source=2)

    def connect(self, address):
        protocol = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_a_silent_connection_is_aborted_after_the_deadline(self):
        _, transport = self.connect(IPv4Address("TCP", "10.0.0.1", 1000))
        self.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_pending_handshakes_per_source_are_capped(self):
        a1, a1t = self.connect(IPv4Address("TCP", "10.0.0.1", 1001))
        _, a2t = self.connect(IPv4Address("TCP", "10.0.0.1", 1002))
        _, a3t = self.connect(IPv4Address("TCP", "10.0.0.1", 1003))
        _, bt = self.connect(IPv4Address("TCP", "10.0.0.2", 1004))
        self.assertEqual([t.disconnected for t in (a1t, a2t, a3t, bt)], [False, False, True, False])
        _, v1t = self.connect(IPv6Address("TCP", "2001:db8::1", 1))
        _, v2t = self.connect(IPv6Address("TCP", "2001:db8::2", 1))
        _, v3t = self.connect(IPv6Address("TCP", "2001:db8::3", 1))  # the same /64
        self.assertEqual([t.disconnected for t in (v1t, v2t, v3t)], [False, False, True])
        a1.connectionLost(Failure(ConnectionDone()))  # one settles: room for another
        _, a4t = self.connect(IPv4Address("TCP", "10.0.0.1", 1005))
        self.assertFalse(a4t.disconnected)


class LostLinkUnitTests(SynchronousTestCase):
    class Link:
        def __init__(self):
            self.peer = PeerAddress("me", "manager", hint="tcp:manager:7420")
            self.innerProtocol = None
            self.closed = Deferred()

        def callRemote(self, command, payload):
            return succeed({"payload": payload, "version": "test"})

    class Pool(LinkPool):
        """The real pool's bookkeeping; its dials answered from ``answers``."""

        def __init__(self):
            super().__init__(dialer=None, factory=None)
            self.answers = []

        def get(self, identity, peer, hints=None):
            link = self.answers.pop(0)
            self.adopt(link)
            return succeed(link)

    def test_pool_observers_pass_the_link_on(self):
        pool, link, seen = self.Pool(), self.Link(), []
        pool.adopt(link)
        link.closed.addCallback(seen.append)
        link.closed.callback(link)
        self.assertEqual((seen, pool.links()), ([link], []))

    def test_keeper_redials_at_once_and_logs_the_loss(self):
        clock, pool = Clock(), self.Pool()
        cluster = type("Cluster", (), {"name": "company", "identity": Identity.generate()})()
        keeper = LinkKeeper(clock, cluster, pool, "manager", "the manager", heartbeat=60)
        first, second = self.Link(), self.Link()
        pool.answers = [first, second]
        keeper.start()
        clock.advance(0)
        self.assertIs(keeper.link, first)
        with capturedLogs() as events:
            first.closed.callback(first)
        self.assertIsNone(keeper.link)
        self.assertIn("company: lost the link to the manager; re-dialing in 1s",
                      [e["log_format"].format(**e) for e in events])
        clock.advance(RETRY_FIRST)
        self.assertIs(keeper.link, second)


class CancelledDialUnitTests(SynchronousTestCase):
    def test_a_cancelled_dial_fed_later_raises_nothing(self):
        class Endpoint:
            def connect(self, factory):
                self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
                self.protocol.makeConnection(StringTransport())
                return succeed(self.protocol)

        endpoint = Endpoint()
        me, peer = Identity.generate(), Identity.generate()
        d = connect_verified(PeerTLS(), me, peer.id52, endpoint, None)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        endpoint.protocol.connectionLost(Failure(ConnectionAborted()))  # the abort completes later
        del endpoint, d
        import gc

        gc.collect()
        self.assertEqual(self.flushLoggedErrors(AlreadyCalledError), [])


class StreamDialQueueUnitTests(SynchronousTestCase):
    """A burst of streams to one peer dials at most MAX_DIALS_PER_PEER links at a time,
    so it stays under the peer's per-source cap on pending handshakes."""

    class Dialer:
        def __init__(self, clock):
            self.reactor, self.timeout, self.dials = clock, 10.0, []

        def connect(self, local, peer, factory, hints=None):
            d = Deferred()
            self.dials.append(d)
            return d

    def test_burst_waits_its_turn_within_the_timeout(self):
        clock = Clock()
        dialer = self.Dialer(clock)
        spares = SpareLinks(dialer, None, spares=0)
        me = Identity.generate()
        taken = [spares.take(me, "peer") for _ in range(MAX_DIALS_PER_PEER + 5)]
        self.assertEqual(len(dialer.dials), MAX_DIALS_PER_PEER)
        self.assertLess(MAX_DIALS_PER_PEER, MAX_PENDING_PER_SOURCE)
        link = LostLinkUnitTests.Link()
        link.ready = succeed({})
        dialer.dials[0].callback(link)  # one is up: the next may dial
        self.assertIs(self.successResultOf(taken[0]), link)
        self.assertEqual(len(dialer.dials), MAX_DIALS_PER_PEER + 1)
        clock.advance(dialer.timeout)  # the rest waited too long
        for d in taken[-4:]:
            self.assertIn("were still being dialed after 10s", str(self.failureResultOf(d, DialError).value))
