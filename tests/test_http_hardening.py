"""HTTP forwarding under attack: real daemons, raw sockets sending the attack bytes, and what the upstream got.

Unit tests of the header rules and of the machine's and the front's timers follow the end-to-end ones.
"""

import http.client
import json
import select
import socket
import time
import uuid

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.config.models import HttpService
from malai.peer.http_headers import HEAD_TIMEOUT, Caller, framing_problem, request_headers, response_headers
from malai.peer.http_proxy import HttpSession, Upstream
from malai.services.http_front import _FrontFactory
from tests.helpers import LoopbackCluster, add_http_fronts, start_http_upstream, wait_for
from tests.test_tcp_forward import _usage

FORGED = "0" * 52


def read_response(f):
    """(status, headers, body) of one response with a Content-Length from the file ``f``, or None at EOF."""
    line = f.readline()
    if not line:
        return None
    status = int(line.split()[1])
    headers = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", "0")))


def close_wait(port: int) -> int:
    """How many TCP sockets on local ``port`` are in CLOSE-WAIT (the peer closed, the owner did not)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "08":
                    count += 1
    return count


def smuggling_request(host: str, tag: str) -> bytes:
    """A POST with both framings: re-chunked, its body is a second request to an upstream that reads Content-Length."""
    inner = f"GET /smuggled-{tag} HTTP/1.1\r\nHost: x\r\nmalai-client-id52: {FORGED}\r\n\r\n".encode()
    size = b"%x\r\n" % len(inner)
    return (f"POST /naive-{tag} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(size)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode() + size + inner + b"\r\n0\r\n\r\n"


class HttpHardeningTests(TestCase):
    """web01 serves admin to laptop; intruder is a member with no right to it."""

    cluster = None

    def setUp(self):
        if HttpHardeningTests.cluster is None:
            HttpHardeningTests._build()

    @classmethod
    def _build(cls):
        cls.upstream_port = start_http_upstream()[0]

        def config(ids, ports):
            return (f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["127.0.0.1:{ports["web01"]}"]\n'
                    f'\n[machine.web01.http.admin]\nport = {cls.upstream_port}\nallow_from = "laptop"\n'
                    f'\n[machine.web01.http.plain]\nport = {cls.upstream_port}\nallow_from = "intruder"\n'
                    f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'
                    f'\n[machine.intruder]\nid52 = "{ids["intruder"]}"\n')

        cls.cluster = LoopbackCluster(("web01", "laptop", "intruder"), config)
        cls.homes = cls.cluster.homes
        cls.front = add_http_fronts(cls.cluster, ("laptop", "intruder"))

    def host(self, who="laptop", service="admin.company") -> str:
        return f"{service}.localhost:{self.front[who]}"

    def connect(self, who="laptop"):
        sock = socket.create_connection(("127.0.0.1", self.front[who]), timeout=30)
        self.addCleanup(sock.close)
        return sock, sock.makefile("rb")

    def exchange(self, request: bytes, who="laptop"):
        """Send ``request`` on a new connection: the first response."""
        sock, f = self.connect(who)
        sock.sendall(request)
        return read_response(f)

    def routed(self):
        """A connection the front has routed to admin, with one answered request on it."""
        sock, f = self.connect()
        sock.sendall(f"GET /bytes/1 HTTP/1.1\r\nHost: {self.host()}\r\n\r\n".encode())
        self.assertEqual(read_response(f)[::2], (200, b"z"))
        return sock, f

    def seen(self, tag: str):
        """The requests the upstream served whose path holds ``tag``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=10)
        conn.request("GET", "/seen")
        seen = json.loads(conn.getresponse().read())
        conn.close()
        return [r for r in seen if tag in r["path"]]

    def web01_log(self) -> str:
        return (self.homes["web01"].root / "log" / "malai.log").read_text()

    # -- #13 item 2: request smuggling ----------------------------------------------------------
    def test_content_length_with_chunked_is_refused_as_first_request(self):
        tag = uuid.uuid4().hex
        status, _, body = self.exchange(smuggling_request(self.host(), tag))
        self.assertEqual(self.seen(tag), [])
        self.assertEqual(status, 400, body)

    def test_content_length_with_chunked_is_refused_on_a_routed_connection(self):
        tag = uuid.uuid4().hex
        sock, f = self.routed()
        sock.sendall(smuggling_request(self.host(), tag))
        status, _, body = read_response(f)
        self.assertEqual(self.seen(tag), [])
        self.assertEqual(status, 400, body)
        self.assertIn(b"Content-Length and Transfer-Encoding", body)
        self.assertEqual(read_response(f), None)  # and the connection is closed

    def test_ambiguous_framing_is_refused(self):
        before = self.web01_log().count("Traceback")
        tag = uuid.uuid4().hex
        host = self.host()
        cases = {
            b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!": (400,),
            b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n": (400, 501),
            b"Transfer-Encoding: gzip\r\n\r\n": (501,),
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n": (400, 501),
            b"Content-Length: 3\r\nConnection: content-length\r\n\r\nabc": (400,),
            b"Transfer-Encoding: chunked\r\nConnection: transfer-encoding\r\n\r\n0\r\n\r\n": (400,),
        }
        for i, (rest, statuses) in enumerate(cases.items()):
            sock, f = self.routed()
            sock.sendall(f"POST /digest-{tag}-{i} HTTP/1.1\r\nHost: {host}\r\n".encode() + rest)
            response = read_response(f)
            self.assertIsNotNone(response, rest)
            self.assertIn(response[0], statuses, (rest, response))
            self.assertEqual(read_response(f), None)
        self.assertEqual(self.seen(tag), [])
        self.assertEqual(self.web01_log().count("Traceback"), before)

    # -- #13 item 3: identity headers --------------------------------------------------------------
    def test_identity_and_forwarding_headers_cannot_be_spoofed(self):
        spoofed = {
            "malai_client_id52": FORGED, "Malai_Client_Machine": "web01", "malai-client_cluster": "other",
            "malai-client-role": "admin", "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6",
            "X-Forwarded-For": "6.6.6.6", "x_forwarded_for": "6.6.6.6", "X_Real_IP": "6.6.6.6",
            "X-Forwarded-Host": "evil.example", "x_forwarded_proto": "https",
        }
        head = "".join(f"{name}: {value}\r\n" for name, value in spoofed.items())
        status, _, body = self.exchange(f"GET /headers HTTP/1.1\r\nHost: {self.host()}\r\n{head}\r\n".encode())
        self.assertEqual(status, 200)
        got = json.loads(body)
        values = [v for _, v in got]
        for value in spoofed.values():
            self.assertNotIn(value, values)
        names = [n.replace("_", "-") for n, _ in got]
        self.assertNotIn("forwarded", names)
        self.assertNotIn("x-real-ip", names)
        self.assertEqual([v for n, v in got if n.replace("_", "-") == "x-forwarded-for"], ["127.0.0.1"])
        self.assertEqual([v for n, v in got if n.replace("_", "-") == "malai-client-id52"],
                         [self.cluster.ids["laptop"]])
        self.assertEqual(sorted(n for n in names if n.startswith("malai-client-")),
                         ["malai-client-cluster", "malai-client-id52", "malai-client-machine"])

    # -- #13 item 4: pipelined requests behind a slow one ---------------------------------------------
    def test_pipelined_requests_behind_a_slow_one_wait_in_the_socket(self):
        pids = {name: self.homes[name].pid() for name in ("laptop", "web01")}
        before = {name: _usage(pid)[1] for name, pid in pids.items()}
        sock, f = self.connect()
        sock.sendall(f"GET /slow HTTP/1.1\r\nHost: {self.host()}\r\n\r\n".encode())
        body = b"\0" * (1 << 20)
        post = f"POST /digest HTTP/1.1\r\nHost: {self.host()}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        sock.setblocking(False)
        sent, pending, deadline = 0, post, time.monotonic() + 2  # /slow answers after 3 s
        while time.monotonic() < deadline and sent < 300 * (1 << 20):
            if not select.select([], [sock], [], 0.1)[1]:
                continue
            try:
                n = sock.send(pending)
            except BlockingIOError:
                continue
            sent += n
            pending = pending[n:] or post
        grown = {name: _usage(pid)[1] - before[name] for name, pid in pids.items()}
        sock.setblocking(True)
        self.assertLess(sent, 64 << 20, f"{sent} bytes of pipelined requests were taken in")
        for name, growth in grown.items():
            self.assertLess(growth, 32 << 20, f"{name} grew by {growth} bytes")
        self.assertEqual(read_response(f)[::2], (200, b"late\n"))  # the slow one is still answered
        self.assertEqual(read_response(f)[0], 200)  # and the next in line

    # -- #13 item 9: short errors ------------------------------------------------------------------
    def test_denied_member_gets_a_short_403(self):
        status, _, body = self.exchange(
            f"GET / HTTP/1.1\r\nHost: {self.host('intruder', 'admin.web01.company')}\r\n\r\n".encode(), who="intruder")
        self.assertEqual(status, 403)
        self.assertIn(b"admin", body)
        for secret in (self.cluster.ids["laptop"], "laptop", "allow_from"):
            self.assertNotIn(secret.encode(), body)
        audit = (self.homes["web01"].root / "log" / "audit.jsonl").read_text()
        self.assertIn("allow_from", audit)  # the detail stays with the machine

    # -- #13 item 13, #22 item 4: dead sockets and slow heads ------------------------------------------
    def test_clients_that_leave_or_dawdle_before_a_head_leave_no_socket(self):
        port, pid = self.front["laptop"], self.homes["laptop"].pid()
        baseline = _usage(pid)[0]
        for i in range(100):
            sock = socket.create_connection(("127.0.0.1", port))
            if i % 2:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: adm")
            sock.close()
        try:
            wait_for(lambda: close_wait(port) == 0 and _usage(pid)[0] <= baseline, 5)
        except AssertionError:
            self.fail(f"{close_wait(port)} sockets in CLOSE-WAIT, descriptors {baseline} → {_usage(pid)[0]}")
        # slowloris: a partial head, a byte a second; the front closes each at its head deadline
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        started = time.monotonic()
        for sock in slow:
            self.addCleanup(sock.close)
            sock.sendall(b"GET / HTTP/1.1\r\nX: ")
            sock.setblocking(False)
        open_ = set(slow)
        while open_ and time.monotonic() - started < 20:
            for sock in list(open_):
                try:
                    sock.send(b"a")
                    if sock.recv(65536) == b"":
                        open_.discard(sock)
                except BlockingIOError:
                    pass
                except OSError:  # reset, or written after the close
                    open_.discard(sock)
            time.sleep(1)
        self.assertEqual(len(open_), 0, "slow heads still open after 20 s")
        self.assertLess(time.monotonic() - started, 15)
        wait_for(lambda: _usage(pid)[0] <= baseline, 5, "the front's descriptors back to where they were")


# -- unit tests --------------------------------------------------------------------------------------

CALLER = Caller("c" * 52, "laptop", "company", "10.0.0.7")


class HeaderRulesTests(SynchronousTestCase):
    def test_names_that_read_as_malai_or_forwarding_headers_are_dropped(self):
        sent = [(b"host", b"admin.company.localhost"), (b"malai_client_id52", b"forged"),
                (b"malai-client_machine", b"forged"), (b"malai-client-anything", b"forged"),
                (b"forwarded", b"for=6.6.6.6"), (b"x-real-ip", b"6.6.6.6"), (b"x_real_ip", b"6.6.6.6"),
                (b"x-forwarded-for", b"6.6.6.6"), (b"x_forwarded_for", b"6.6.6.6"), (b"x-forwarded-proto", b"https"),
                (b"transfer_encoding", b"chunked"), (b"content_length", b"0"), (b"malaiclient", b"kept"),
                (b"x-custom_name", b"kept")]
        out = request_headers(sent, CALLER, "127.0.0.1:8080", inject=True)
        self.assertNotIn(b"forged", [v for _, v in out])
        self.assertNotIn(b"6.6.6.6", [v for _, v in out])
        self.assertEqual(out, [
            (b"host", b"127.0.0.1:8080"), (b"malaiclient", b"kept"), (b"x-custom_name", b"kept"),
            (b"x-forwarded-for", b"10.0.0.7"), (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-host", b"admin.company.localhost"), (b"malai-client-id52", b"c" * 52),
            (b"malai-client-machine", b"laptop"), (b"malai-client-cluster", b"company")])
        without = request_headers(sent, CALLER, "127.0.0.1:8080", inject=False)
        self.assertEqual([n for n, _ in without if n.replace(b"_", b"-").startswith(b"malai-client")], [])

    def test_a_chunked_message_never_carries_a_content_length_on(self):
        both = [(b"host", b"a"), (b"content-length", b"4"), (b"transfer-encoding", b"chunked")]
        out = request_headers(both, CALLER, "u", inject=False)
        self.assertNotIn(b"content-length", [n for n, _ in out])
        self.assertEqual([v for n, v in out if n == b"transfer-encoding"], [b"chunked"])
        self.assertEqual(response_headers([(b"content-length", b"4"), (b"transfer-encoding", b"chunked"),
                                           (b"x", b"y")], 200), [(b"x", b"y")])
        self.assertEqual(response_headers([(b"content-length", b"4")], 200), [(b"content-length", b"4")])

    def test_framing_problems(self):
        self.assertIsNone(framing_problem([(b"content-length", b"3"), (b"connection", b"keep-alive")]))
        self.assertIsNone(framing_problem([(b"transfer-encoding", b"chunked")]))
        self.assertIn("both", framing_problem([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")]))
        self.assertIn("content-length", framing_problem([(b"content-length", b"3"),
                                                         (b"connection", b"close, Content-Length")]))
        self.assertIn("transfer-encoding", framing_problem([(b"connection", b"transfer-encoding")]))


class FakePool:
    """Hands out upstreams on string transports."""

    def __init__(self):
        self.upstreams, self.released = [], []

    def acquire(self, service):
        upstream = Upstream((service.host, service.port, False))
        upstream.makeConnection(StringTransport())
        self.upstreams.append(upstream)
        return succeed(upstream)

    def release(self, upstream):
        self.released.append(upstream)


class FakeAudit:
    def __init__(self):
        self.records = []

    def record(self, **fields):
        self.records.append(fields)


def caller_bytes(transport: StringTransport) -> bytes:
    """What the session sent the caller, then ``<EOF>`` if it ended its stream."""
    return transport.value() + (b"<EOF>" if transport.disconnecting else b"")


class SessionTests(SynchronousTestCase):
    """The machine's HttpSession with a clock and string transports."""

    def setUp(self):
        self.clock, self.pool, self.audit = Clock(), FakePool(), FakeAudit()
        self.session = HttpSession(self.clock, HttpService("admin", 8080), CALLER, self.pool, self.audit, "rule")
        self.link = StringTransport()
        self.session.makeConnection(self.link)

    def send(self, data: bytes) -> None:
        self.session.dataReceived(data)

    def answer(self, upstream: Upstream, body: bytes = b"ok") -> None:
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    def test_an_idle_link_closes_at_the_head_deadline(self):
        self.clock.advance(HEAD_TIMEOUT - 0.1)
        self.assertFalse(self.link.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.link.disconnecting)
        self.assertEqual(caller_bytes(self.link), b"<EOF>")

    def test_a_slow_head_gets_408(self):
        for _ in range(int(HEAD_TIMEOUT) - 1):  # a byte a second does not move the deadline
            self.send(b"G")
            self.clock.advance(1)
        self.assertFalse(self.link.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.link.disconnecting)
        self.assertTrue(caller_bytes(self.link).startswith(b"HTTP/1.1 408 "))
        self.assertEqual(self.pool.upstreams, [])

    def test_keep_alive_idle_timeout_after_an_exchange_not_during_it(self):
        self.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        [upstream] = self.pool.upstreams
        self.clock.advance(30)  # the upstream takes its time: the service's timeout (60 s) applies
        self.assertFalse(self.link.disconnecting)
        self.answer(upstream)
        self.assertTrue(caller_bytes(self.link).endswith(b"\r\n\r\nok"))
        self.clock.advance(HEAD_TIMEOUT - 0.1)
        self.assertFalse(self.link.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.link.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pipelined_requests_stop_the_link_until_their_turn(self):
        self.send(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
        [first] = self.pool.upstreams
        self.assertEqual(self.link.producerState, "producing")
        self.send(b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n")
        self.assertEqual(self.link.producerState, "paused")  # the rest stays in the socket
        self.assertEqual(len(self.pool.upstreams), 1)
        self.answer(first)
        self.assertEqual(len(self.pool.upstreams), 2)  # the second request went on
        self.assertIn(b"GET /next ", self.pool.upstreams[1].transport.value())
        self.assertEqual(self.link.producerState, "producing")

    def test_an_upgrade_reads_on_and_outlives_the_timers(self):
        self.send(b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        [upstream] = self.pool.upstreams
        self.assertEqual(self.link.producerState, "paused")  # until the upstream says whether it switches
        upstream.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        self.assertEqual(self.link.producerState, "producing")
        self.clock.advance(3600)
        self.assertFalse(self.link.disconnecting)
        self.send(b"frame")
        self.assertTrue(upstream.transport.value().endswith(b"frame"))

    def test_ambiguous_framing_is_refused_before_any_upstream(self):
        self.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n")
        self.assertTrue(caller_bytes(self.link).startswith(b"HTTP/1.1 400 "))
        self.assertTrue(self.link.disconnecting)
        self.assertEqual(self.pool.upstreams, [])
        self.assertEqual(self.audit.records[0]["status"], 400)

    def test_connect_is_refused(self):
        self.send(b"CONNECT 10.0.0.1:22 HTTP/1.1\r\nhost: 10.0.0.1:22\r\n\r\n")
        self.assertTrue(caller_bytes(self.link).startswith(b"HTTP/1.1 405 "))
        self.assertEqual(self.pool.upstreams, [])

    def test_an_upstream_that_said_more_than_its_answer_is_not_reused(self):
        self.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        [upstream] = self.pool.upstreams
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                              b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged")
        self.assertEqual(self.pool.released, [upstream])
        self.assertFalse(upstream.reusable())
        self.assertNotIn(b"forged", caller_bytes(self.link))


class FrontTests(SynchronousTestCase):
    """The member's front before a connection is routed."""

    def setUp(self):
        self.clock = Clock()
        context = type("Context", (), {"reactor": self.clock})()
        self.end = _FrontFactory(context, None).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.browser = StringTransport()
        self.end.makeConnection(self.browser)

    def test_a_client_that_ends_before_a_head_is_closed_at_once(self):
        self.end.dataReceived(b"GET / HTTP/1.1\r\nHost: adm")
        self.end.readConnectionLost()
        self.assertTrue(self.browser.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_idle_connection_closes_at_the_head_deadline(self):
        self.clock.advance(HEAD_TIMEOUT)
        self.assertTrue(self.browser.disconnecting)
        self.assertEqual(self.browser.value(), b"")

    def test_a_slow_head_gets_408_at_the_deadline(self):
        for _ in range(int(HEAD_TIMEOUT)):
            self.end.dataReceived(b"X")
            self.clock.advance(1)
        self.assertTrue(self.browser.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertTrue(self.browser.disconnecting)

    def test_ambiguous_framing_is_refused_at_the_front(self):
        self.end.dataReceived(b"POST / HTTP/1.1\r\nHost: a.b.localhost\r\nContent-Length: 3\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        self.assertTrue(self.browser.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertIn(b"both Content-Length and Transfer-Encoding", self.browser.value())
        self.assertEqual(self.clock.getDelayedCalls(), [])
