"""The peer link layer under attack, crash and load: bounded boxes, handshake deadlines,
one log line per offending link, a stop that always stops, a lost manager noticed at once.

Real daemons where the item crosses a process (attacks with raw TLS and TCP sockets);
Twisted's fakes for the protocol logic and the timers."""

import json
import os
import signal
import socket
import ssl
import struct
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional, Set

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import AlreadyCalledError, CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.ampbox import decode_box, encode_box
from malai.identity import Identity
from malai.p2p.link import HANDSHAKE_TIMEOUT, MAX_PENDING_PER_SOURCE, PeerAddress, connect_verified, server_factory
from malai.p2p.tls import ALPN, PeerTLS, make_certificate
from malai.peer.commands import PROTOCOL_VERSION
from malai.peer.links import LinkPool
from malai.peer.mux import MuxLink, StreamRefused
from malai.peer.protocol import MAX_BOX_BYTES, MAX_BOX_KEYS, HelloInfo, PeerAMP, PeerAMPFactory
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


class H2Client:
    """The dialer's half of a malai/2 link's HTTP/2 framing, sans I/O: ``output()`` is what to
    send, ``receive(data)`` takes what came. DATA is acknowledged as it arrives (this side
    always reads) and kept per stream; answers, ends, resets and GOAWAY are recorded."""

    def __init__(self):
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.answers: Dict[int, dict] = {}  # stream id -> the HEADERS that answered its open
        self.data: Dict[int, bytearray] = defaultdict(bytearray)
        self.ended: Set[int] = set()
        self.resets: Dict[int, int] = {}
        self.goaway: Optional[int] = None

    def open(self, kind: bytes, target: bytes = b"", headers=()) -> int:
        """Send a stream-open HEADERS frame; the new stream's id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", target),
                                           (b"malai-kind", kind), *headers])
        return stream_id

    def send_data(self, stream_id: int, data) -> int:
        """One DATA frame of ``data``, as much as the windows allow: the bytes framed (0: wait)."""
        window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
        size = min(window, len(data))
        if size > 0:
            self.conn.send_data(stream_id, bytes(data[:size]))
        return size

    def receive(self, data: bytes) -> None:
        if self.goaway is not None:
            return  # h2 takes nothing after GOAWAY
        for event in self.conn.receive_data(data):
            if isinstance(event, ResponseReceived):
                self.answers[event.stream_id] = dict(event.headers)
            elif isinstance(event, DataReceived):
                self.data[event.stream_id] += event.data
                if event.flow_controlled_length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, StreamReset):
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, ConnectionTerminated):
                self.goaway = event.error_code

    def output(self) -> bytes:
        return self.conn.data_to_send()


def control_stream(client: H2Client) -> int:
    """Open the dialer's control stream (the first stream, which carries AMP)."""
    return client.open(b"control")


class RawTLS:
    """A blocking TLS client over memory BIOs: what goes on the wire, record by record, is ours.

    Unless ``h2`` is false it then speaks the link's HTTP/2 (``H2Client``) and opens the
    control stream: ``send`` puts AMP bytes on it as DATA, ``box`` reads AMP boxes from it."""

    def __init__(self, ctx: ssl.SSLContext, addr: str, server_id52: str, timeout: float = 5.0,
                 source: str = "", h2: bool = True):
        host, _, port = addr.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout, source_address=(source, 0))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_id52)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._pull()
        self._flush()
        self.h2 = H2Client()
        self.control = 0
        self.ended = False  # the daemon's close_notify, or the end of the connection, came
        if h2:
            self.control = control_stream(self.h2)
            self._write_h2()
            answer = self.answer(self.control)
            if answer.get(b":status") != b"200":
                raise ConnectionError(f"the control stream was refused: {answer}")

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _pull(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.ended = True
            raise ConnectionError("closed by the daemon")
        self.incoming.write(data)

    def _write_h2(self, flush: bool = True) -> None:
        """What h2 framed, as one TLS record (more if over 16 KiB)."""
        data = self.h2.output()
        if data:
            self.tls.write(data)
        if flush:
            self._flush()

    def _read(self) -> None:
        """Wait for what the daemon sends next and hand it to h2 (which may answer: PING, SETTINGS)."""
        while True:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                self._pull()
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            if not data:
                self.ended = True
                raise ConnectionError("closed by the daemon")
            break
        try:
            self.h2.receive(data)
        except ProtocolError as e:
            raise ConnectionError(f"HTTP/2 from the daemon: {e}") from None
        self._write_h2()

    def _alive(self, stream_id: int) -> None:
        if self.h2.goaway is not None:
            raise ConnectionError(f"the daemon sent GOAWAY ({self.h2.goaway})")
        if stream_id in self.h2.resets:
            raise ConnectionError(f"the daemon reset stream {stream_id} ({self.h2.resets[stream_id]})")

    def send(self, *records: bytes) -> None:
        """Each argument DATA on the control stream in TLS records of its own, all in one write
        unless a window runs short: then read (and ack) until the daemon grants more."""
        self.send_on(self.control, *records)

    def send_on(self, stream_id: int, *records: bytes) -> None:
        for record in records:
            view = memoryview(record)
            while view:
                self._alive(stream_id)
                try:
                    size = self.h2.send_data(stream_id, view)
                except ProtocolError as e:  # the stream or the link is closed
                    raise ConnectionError(f"stream {stream_id}: {e}") from None
                if size == 0:
                    self._write_h2()
                    self._read()
                view = view[size:]
            self._write_h2(flush=False)
        self._flush()

    def open(self, kind: bytes, target: bytes = b"", headers=()) -> int:
        """Open a stream (sent at once); ``answer`` waits for what the daemon says."""
        stream_id = self.h2.open(kind, target, headers)
        self._write_h2()
        return stream_id

    def answer(self, stream_id: int) -> dict:
        """The HEADERS answering a stream's open, or ``{b"reset": code}`` if it was reset first."""
        while stream_id not in self.h2.answers:
            if stream_id in self.h2.resets:
                return {b"reset": self.h2.resets[stream_id]}
            if self.h2.goaway is not None:
                raise ConnectionError(f"the daemon sent GOAWAY ({self.h2.goaway})")
            self._read()
        return self.h2.answers[stream_id]

    def reset(self, stream_id: int, code: int = 0x8) -> None:
        self.h2.conn.reset_stream(stream_id, code)
        self._write_h2()

    def box(self) -> dict:
        """The next AMP box on the control stream."""
        buffer = self.h2.data[self.control]
        while True:
            decoded = decode_box(bytes(buffer))
            if decoded is not None:
                box, used = decoded
                del buffer[:used]
                return box
            self._alive(self.control)
            self._read()

    def hello(self) -> dict:
        self.send(hello_box())
        return self.box()

    def ping(self, payload: bytes = b"still here") -> dict:
        """Ping the daemon on the control stream: its answer (its own commands, a config push, skipped)."""
        self.send(encode_box({b"_command": b"Ping", b"_ask": b"77", b"payload": payload}))
        while True:
            box = self.box()
            if box.get(b"_answer") == b"77" or box.get(b"_error") == b"77":
                return box

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Whether the daemon ends the link within ``timeout``: its TLS close_notify (after a
        GOAWAY; it then waits for ours, which this client never sends) or the end of the TCP
        connection."""
        deadline = time.monotonic() + timeout
        try:
            while not self.ended:
                while True:  # what TLS holds already (a close_notify behind the last GOAWAY), then more
                    try:
                        if not self.tls.read(65536):
                            return True
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        return True
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.incoming.write(data)
            return True
        except (ConnectionResetError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def hello_box() -> bytes:
    return encode_box({b"_command": b"Hello", b"_ask": b"1", b"protocol": b"%d" % PROTOCOL_VERSION, b"features": b"",
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
        # the daemon said GOAWAY and close_notify; a peer that never answers them is cut off
        self.assertTrue(closed(raw.sock, 15), "the TCP connection stayed open")

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


def exec_header(**fields) -> list:
    """The ``malai-exec`` header of a well-formed request for ``id``, with ``fields`` changed."""
    request = {"argv": ["id"], "tty": False, "term": "xterm", "rows": 24, "cols": 80, **fields}
    return [(b"malai-exec", json.dumps(request).encode())]


class StreamOpenTests(TestCase):
    """A member with no rights opening streams with forged headers: each stream is refused
    (``:status`` with ``malai-error`` and ``malai-reason``), the link stays usable, and
    thousands of them leave nothing behind."""

    FORGED = {
        "no header": ([], b"400"),
        "not JSON": ([(b"malai-exec", b"{argv: id")], b"400"),
        "not an object": ([(b"malai-exec", b'["id"]')], b"400"),
        "unknown field": (exec_header(user="root"), b"400"),
        "an int for a bool": (exec_header(tty=1), b"400"),
        "a bool for an int": (exec_header(rows=True), b"400"),
        "argv of numbers": (exec_header(argv=[1, 2]), b"400"),
        "a text timeout": (exec_header(timeout="1"), b"400"),
        "twice": (exec_header() * 2, b"400"),
        "over the exec limit": (exec_header(argv=["x" * (49 * 1024)]), b"400"),
        "over the request limit": (exec_header(argv=["x" * (60 * 1024)]), b"400"),
        "a NaN timeout": ([(b"malai-exec", exec_header()[0][1][:-1] + b', "timeout": NaN}')], b"400"),
        "argv and a line": (exec_header(line="id"), b"400"),
        "a shell line": (exec_header(argv=[], line="id; cat /etc/shadow"), b"403"),
        "a subsystem": (exec_header(argv=[], subsystem="sftp"), b"403"),
        "well formed": (exec_header(), b"403"),
    }

    def test_forged_exec_headers_are_refused_and_the_link_stays_usable(self):
        m = Manager(self)
        raw = m.link()
        for name, (headers, status) in self.FORGED.items():
            answer = raw.answer(raw.open(b"exec", b"company", headers))
            self.assertEqual(answer.get(b":status"), status, f"{name}: {answer}")
            self.assertIn(answer.get(b"malai-error"), (b"BAD_REQUEST", b"NOT_ALLOWED"), name)
            self.assertTrue(answer.get(b"malai-reason"), name)
            self.assertLess(len(answer[b"malai-reason"]), 400, name)
            self.assertEqual(raw.ping()[b"payload"], b"still here", name)  # the link still serves
        self.assertFalse(raw.closed_by_peer(0.2))
        log = m.log()
        self.assertEqual(refusals(log), [])
        self.assertNotIn("Traceback", log)

    def test_headers_past_the_links_limit_close_that_link_only(self):
        m = Manager(self)
        raw = m.link()
        raw.open(b"exec", b"company", exec_header(argv=["x" * (70 * 1024)]))  # over SETTINGS_MAX_HEADER_LIST_SIZE
        self.assertTrue(raw.closed_by_peer(), "the link stayed open")
        wait_for(lambda: refusals(m.log()), what="a log line")
        [line] = refusals(m.log())
        self.assertIn(m.mallory.id52, line)
        self.assertNotIn("Traceback", m.log())
        self.assertEqual(m.link().ping()[b"payload"], b"still here")

    def test_ten_thousand_refused_or_reset_streams_leave_nothing_behind(self):
        m = Manager(self)
        raw = m.link()
        attacks = [
            (b"exec", b"company", [(b"malai-exec", b"garbage")]),
            (b"exec", b"company", exec_header()),
            (b"nope", b"x", []),
            (b"tcp", b"mysql", []),
            (b"relayed", b"y" * 52, []),
            (b"exec", b"company", exec_header()),  # reset by us at once
        ]
        for i in range(600):  # warm up: the daemon's buffers and h2's closed-stream memory fill
            kind, target, headers = attacks[i % 5]
            raw.answer(raw.open(kind, target, headers))
        fds, rss = fd_count(m.pid), rss_kib(m.pid)
        start, answered = time.monotonic(), 0
        for batch in range(100):
            opened = []
            for i in range(100):
                which = (batch * 100 + i) % len(attacks)
                stream_id = raw.open(*attacks[which])
                if which == len(attacks) - 1:
                    raw.reset(stream_id)
                else:
                    opened.append(stream_id)
            for stream_id in opened:
                answer = raw.answer(stream_id)
                self.assertNotEqual(answer.get(b":status"), b"200", answer)
                answered += 1
        elapsed = time.monotonic() - start
        self.assertEqual(raw.ping()[b"payload"], b"still here")
        held, grown = fd_count(m.pid) - fds, (rss_kib(m.pid) - rss) // 1024
        self.assertLessEqual(held, 0, f"the daemon holds {held} more descriptors")
        self.assertLess(grown, 8, f"the daemon grew by {grown} MB")
        log = m.log()
        self.assertEqual(refusals(log), [])
        self.assertNotIn("Traceback", log)
        print(f"\n10,000 streams ({answered} refused, the rest reset) in {elapsed:.1f}s; "
              f"daemon RSS {grown:+d} MB, fds {held:+d}")


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


def accepted_link(responder=None, clock=None) -> SimpleNamespace:
    """A listener's ``MuxLink`` with its ``PeerAMP`` control stream, on a string transport,
    dialed by an ``H2Client`` whose control stream is open: ``exchange()`` hands what each
    side framed to the other until both are quiet."""
    clock = clock or Clock()
    control = PeerAMPFactory(HelloInfo(), dialer=False, clock=clock).buildProtocol
    link = MuxLink(PeerAddress("me", "peer-id52"), dialer=False, responder=responder, control=control,
                   clock=clock)
    transport = StringTransport()
    link.makeConnection(transport)
    client = H2Client()
    peer = SimpleNamespace(link=link, client=client, transport=transport, clock=clock,
                           control=control_stream(client))

    def exchange() -> None:
        for _ in range(100):
            out = client.output()
            if out:
                link.dataReceived(out)
            clock.advance(0)  # the link answers new streams a few per reactor turn
            back = transport.value()
            transport.clear()
            if back:
                client.receive(back)
            if not (out or back):
                return

    peer.exchange = exchange
    exchange()
    return peer


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

    def test_closed_fires_when_a_streams_protocol_fails(self):
        """Pools and shutdown wait for a link's ``closed``: a stream protocol raising as the
        link is lost ends its stream only."""
        class Broken(Protocol):
            def connectionLost(self, reason):
                raise RuntimeError("broken")

        peer = accepted_link(responder=lambda request: Broken())
        stream_id = peer.client.open(b"tcp", b"svc")
        peer.exchange()
        self.assertEqual(peer.client.answers[stream_id][b":status"], b"200")
        peer.link.connectionLost(Failure(ConnectionDone()))
        self.assertIs(self.successResultOf(peer.link.closed), peer.link)
        self.assertEqual(peer.link.streams, {})
        self.assertTrue(peer.link.control.closed.called)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class StreamOpenUnitTests(SynchronousTestCase):
    def test_a_stream_reset_in_the_read_that_opened_it_is_refused_quietly(self):
        """Found by fuzzing: a refusal answered a stream h2 already knew reset (HEADERS and
        RST_STREAM in one read), raised StreamClosedError, logged a traceback and aborted the link."""
        def refuse(request):
            raise StreamRefused("no", "NOT_ALLOWED")

        peer = accepted_link(responder=refuse)
        with capturedLogs() as events:
            for headers in ([(b"x-a", b"1"), (b"x-a", b"2")], []):  # refused by the link, by the responder
                stream_id = peer.client.open(b"exec", b"company", headers)
                peer.client.conn.reset_stream(stream_id, 8)
                peer.exchange()
        self.assertEqual([e for e in events if e.get("log_failure")], [])
        self.assertFalse(peer.link._gone)
        self.assertEqual(list(peer.link.streams), [peer.control])


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
        """What the pool and the keeper use of a ready ``MuxLink``."""

        accepting = True
        control = SimpleNamespace(peer_hello={}, ready=succeed({}))

        def __init__(self, local="me", peer="manager", dialer=True):
            self.peer = PeerAddress(local, peer, hint="tcp:manager:7420")
            self.dialer = dialer
            self.closed = Deferred()
            self.drained = False  # the pool never drains a link

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


class PoolUnitTests(SynchronousTestCase):
    """One link per pair: a burst shares one dial, simultaneous dials settle on one link."""

    class Dialer:
        def __init__(self):
            self.dials = []

        def connect(self, local, peer, factory, hints=None):
            d = Deferred()
            self.dials.append(d)
            return d

    def test_a_burst_of_streams_shares_one_dial(self):
        dialer = self.Dialer()
        pool = LinkPool(dialer, None)
        me = Identity.generate()
        waiting = [pool.get(me, "peer") for _ in range(100)]
        self.assertEqual(len(dialer.dials), 1)
        link = LostLinkUnitTests.Link(me.id52, "peer")
        link.ready = succeed(link)
        dialer.dials[0].callback(link)
        self.assertEqual({id(self.successResultOf(d)) for d in waiting}, {id(link)})
        self.assertIs(self.successResultOf(pool.get(me, "peer")), link)
        self.assertEqual(len(dialer.dials), 1)

    def test_when_the_link_used_closes_another_ready_one_takes_over(self):
        """A machine behind NAT re-dialed while its old link was still taken for alive: once the
        old one closes, its new link is used (else the pair would have none until the next dial)."""
        Link = LostLinkUnitTests.Link
        pool = LinkPool(None, None)
        old, new = Link("me", "machine", dialer=False), Link("me", "machine", dialer=False)
        self.assertIs(pool.adopt(old), old)
        self.assertIs(pool.adopt(new), old)  # the older of two the machine dialed
        old.closed.callback(old)
        self.assertIs(pool.current("me", "machine"), new)
        new.closed.callback(new)
        self.assertIsNone(pool.current("me", "machine"))
        self.assertEqual((pool._links, pool._others), ({}, {}))

    def test_simultaneous_dials_settle_on_the_smaller_id52s_link_on_both_sides(self):
        small, large = "a" * 52, "b" * 52
        Link = LostLinkUnitTests.Link
        # each side holds the link it dialed and the one it accepted
        small_side = (Link(small, large, dialer=True), Link(small, large, dialer=False))
        large_side = (Link(large, small, dialer=False), Link(large, small, dialer=True))
        for order in [(0, 1), (1, 0)]:
            kept = []
            for side in (small_side, large_side):
                pool = LinkPool(None, None)
                for i in order:
                    pool.adopt(side[i])
                kept.append(pool.current(side[0].peer.local, side[0].peer.peer))
                self.assertEqual([link.drained for link in side], [False, False])  # the other one idles out
            self.assertTrue(kept[0].dialer and not kept[1].dialer)  # the link the small side dialed, on both
