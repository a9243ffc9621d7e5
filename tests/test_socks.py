"""``malai socks`` (issue 19): SOCKS5 whose names are malai names.

Unit tests drive the protocol on a StringTransport (whole, byte by byte, hostile, oversized and
truncated input, the deadline); then a loopback cluster where web01 offers an HTTP upstream both as
an HTTP service and as a TCP service, curl reaches each through the real proxy, and a denied
caller gets a SOCKS failure and a line on the proxy's stderr."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.errors import MalaiError
from malai.services import socks
from malai.services.socks import Request, SocksServer
from tests.helpers import LoopbackCluster, add_http_fronts, free_port, start_http_upstream, wait_for

MALAI = str(Path(sys.executable).with_name("malai"))
GREETING = b"\x05\x01\x00"


def by_name(name: str, port: int = 80, command: int = socks.CONNECT) -> bytes:
    raw = name.encode()
    return bytes([5, command, 0, socks.NAME, len(raw)]) + raw + struct.pack(">H", port)


class _Inner(Protocol):
    """What a route hands the connection to: records what it is given."""

    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data


class _Client:
    """A SocksServer on a StringTransport; routes are recorded (and handed to an _Inner)."""

    def __init__(self, route=None, timeout: float = 10):
        self.clock = Clock()
        self.routed = []
        self.inner = _Inner()
        self.server = SocksServer(route or self._route, self.clock, timeout)
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)

    def _route(self, server, request):
        self.routed.append(request)
        server.hand_to(self.inner)

    def send(self, data: bytes, step: int = 0):
        for i in range(0, len(data), step or max(1, len(data))):
            self.server.dataReceived(data[i:i + (step or len(data))])

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


class ProtocolTests(SynchronousTestCase):
    def test_connect_by_name(self):
        for step in (0, 1):  # in one chunk, then a byte at a time
            c = _Client()
            c.send(GREETING + by_name("web.web01.company", 6379), step)
            self.assertEqual(c.transport.value(), b"\x05\x00")
            self.assertEqual(c.routed, [Request(socks.CONNECT, socks.NAME, "web.web01.company", 6379)])
            self.assertFalse(c.closed)
            self.assertEqual(c.clock.getDelayedCalls(), [])  # the deadline is over

    def test_data_sent_with_the_request_reaches_the_route(self):
        c = _Client()
        c.send(b"\x05\xff" + bytes(range(255)) + by_name("x" * 255) + b"GET / HTTP/1.1\r\n" * 4096)
        self.assertEqual(c.routed[0].host, "x" * 255)
        self.assertEqual(c.inner.data, b"GET / HTTP/1.1\r\n" * 4096)
        self.assertEqual(c.server.buffer, b"")

    def test_ip_addresses_are_parsed(self):
        c = _Client()
        c.send(GREETING + b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50")
        self.assertEqual(c.routed, [Request(socks.CONNECT, socks.IPV4, "10.0.0.1", 80)])
        c = _Client()
        c.send(GREETING + b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x01\xbb")
        self.assertEqual(c.routed, [Request(socks.CONNECT, socks.IPV6, "::1", 443)])

    def test_no_acceptable_method(self):
        c = _Client()
        c.send(b"\x05\x02\x01\x02")  # GSSAPI and username/password only
        self.assertEqual(c.transport.value(), b"\x05\xff")
        self.assertTrue(c.closed)
        c = _Client()
        c.send(b"\x05\x00")
        self.assertEqual((c.transport.value(), c.closed), (b"\x05\xff", True))

    def test_not_socks5_is_closed_without_an_answer(self):
        for hello in (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01"):
            c = _Client()
            c.send(hello)
            self.assertEqual((c.transport.value(), c.closed, c.routed), (b"", True, []))

    def test_only_connect(self):
        for command in (socks.BIND, socks.UDP_ASSOCIATE, 9):
            c = _Client()
            c.send(GREETING + by_name("web.web01.company", command=command))
            self.assertEqual(c.transport.value(), b"\x05\x00" + socks.reply(socks.COMMAND_NOT_SUPPORTED))
            self.assertEqual((c.closed, c.routed), (True, []))

    def test_bad_requests(self):
        cases = {
            b"\x05\x01\x00\x05\x00\x00": socks.ADDRESS_NOT_SUPPORTED,  # address type 5
            b"\x04\x01\x00\x01\x00\x00\x00\x00\x00\x00": socks.FAILURE,  # a request of another version
            by_name(""): socks.HOST_UNREACHABLE,
            by_name("caf\xe9.web01.company"): socks.HOST_UNREACHABLE,  # not ASCII
            by_name("a\nb"): socks.HOST_UNREACHABLE,
        }
        for request, code in cases.items():
            c = _Client()
            c.send(GREETING + request)
            self.assertEqual(c.transport.value(), b"\x05\x00" + socks.reply(code), request)
            self.assertEqual((c.closed, c.routed), (True, []))

    def test_nothing_more_is_read_after_a_refusal(self):
        c = _Client()
        c.send(GREETING + by_name("a", command=socks.BIND))
        c.send(b"x" * 1_000_000)
        self.assertLess(len(c.server.buffer), 300)

    def test_deadline(self):
        c = _Client(timeout=10)
        c.send(GREETING + by_name("web.web01.company")[:7])  # a truncated request
        c.clock.advance(9.9)
        self.assertFalse(c.closed)
        c.clock.advance(0.1)
        self.assertEqual(c.transport.value(), b"\x05\x00" + socks.reply(socks.FAILURE))
        self.assertEqual((c.closed, c.routed), (True, []))
        c = _Client(timeout=10)  # a client that says nothing is closed without an answer
        c.clock.advance(10)
        self.assertEqual((c.transport.value(), c.closed), (b"", True))

    def test_truncated_then_gone(self):
        c = _Client()
        c.send(GREETING + by_name("web.web01.company")[:-1])
        c.server.connectionLost(None)
        self.assertEqual((c.routed, c.clock.getDelayedCalls()), ([], []))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2000), st.integers(1, 600))
    def test_any_input(self, data, step):
        """Whatever comes, in whatever pieces: routed once, refused and closed, or waiting with a small buffer."""
        c = _Client()
        c.send(data, step)
        self.assertLessEqual(len(c.routed), 1)
        if not c.routed and not c.closed:
            self.assertLessEqual(len(c.server.buffer), 2 + 255 + 262)


class _Context:
    """A stand-in for the daemon: no cluster but ``company``, which has no machine ``nowhere``."""

    def __init__(self):
        self.reactor = Clock()

    def cluster(self, alias):
        if alias != "company":
            raise MalaiError(f"no cluster {alias!r} here")
        return self

    def target(self, machine):
        raise MalaiError(f"cluster company has no machine {machine!r} that this device may reach")


class RouteTests(SynchronousTestCase):
    """Only malai names are served, with the right reply codes."""

    def answer(self, request: bytes, front=None) -> bytes:
        factory = socks._SocksFactory(_Context(), front)
        server = factory.buildProtocol(type("Addr", (), {"host": "127.0.0.1", "port": 5})())
        transport = StringTransport()
        server.makeConnection(transport)
        server.dataReceived(GREETING + request)
        self.assertTrue(transport.disconnecting)
        return transport.value()[2:]

    def test_refusals(self):
        self.assertEqual(self.answer(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"), socks.reply(socks.NOT_ALLOWED))
        self.assertEqual(self.answer(by_name("example.com", 443)), socks.reply(socks.HOST_UNREACHABLE))
        self.assertEqual(self.answer(by_name("a.b.c.d")), socks.reply(socks.HOST_UNREACHABLE))
        self.assertEqual(self.answer(by_name("web.nowhere.company")), socks.reply(socks.HOST_UNREACHABLE))
        self.assertEqual(self.answer(by_name("web.web01.other")), socks.reply(socks.HOST_UNREACHABLE))
        self.assertEqual(self.answer(by_name("admin.company.localhost")), socks.reply(socks.HOST_UNREACHABLE))


class _Proxy:
    """``malai socks --listen 127.0.0.1:0`` of one member, in the foreground."""

    def __init__(self, home: Path):
        self.proc = subprocess.Popen([MALAI, "socks", "--listen", "127.0.0.1:0"], env=dict(os.environ, MALAI_HOME=str(home)),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("SOCKS5 proxy on "):
            self.proc.kill()
            raise AssertionError(f"malai socks did not start: {line}{self.proc.stderr.read()}")
        self.address = line.split()[3].rstrip(":")
        self.line = line

    def stop(self) -> str:
        """Stop it; what it said on stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return err

    def curl(self, url: str, *args: str):
        return subprocess.run(["curl", "-sS", "--max-time", "30", "--socks5-hostname", self.address, *args, url],
                              capture_output=True, text=True, timeout=60)


class SocksEndToEndTests(TestCase):
    """web01 offers one HTTP upstream as http ``admin`` (laptop), http ``open`` (everyone) and tcp ``web``
    (laptop); the laptop's daemon has an HTTP front, the intruder's has none."""

    cluster = None

    def setUp(self):
        if SocksEndToEndTests.cluster is None:
            SocksEndToEndTests._build()

    @classmethod
    def _build(cls):
        port, _ = start_http_upstream()
        cls.banner = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=_banner, args=(cls.banner,), daemon=True).start()

        def config(ids, ports):
            return (f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["127.0.0.1:{ports["web01"]}"]\n'
                    'allow_from = "laptop"\n'
                    f'\n[machine.web01.http.admin]\nport = {port}\nallow_from = "laptop"\n'
                    f'\n[machine.web01.http.open]\nport = {port}\nallow_from = "laptop, intruder"\n'
                    f'\n[machine.web01.tcp.web]\nport = {port}\nallow_from = "laptop"\n'
                    f'\n[machine.web01.tcp.banner]\nport = {cls.banner.getsockname()[1]}\nallow_from = "laptop"\n'
                    f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'
                    f'\n[machine.intruder]\nid52 = "{ids["intruder"]}"\n')

        cls.cluster = LoopbackCluster(("web01", "laptop", "intruder"), config)
        cls.homes = cls.cluster.homes
        cls.front = add_http_fronts(cls.cluster, ("laptop",))

    def proxy(self, who: str) -> _Proxy:
        proxy = _Proxy(self.homes[who].root)
        self.addCleanup(lambda: proxy.proc.poll() is None and proxy.stop())
        return proxy

    def test_http_service_through_the_daemons_front(self):
        proxy = self.proxy("laptop")
        self.assertIn(f"the daemon's HTTP front 127.0.0.1:{self.front['laptop']}", proxy.line)
        r = proxy.curl("http://admin.company.localhost/headers")
        self.assertEqual(r.returncode, 0, r.stderr)
        headers = dict(json.loads(r.stdout))
        self.assertEqual(headers["malai-client-id52"], self.cluster.ids["laptop"])
        self.assertEqual(headers["x-forwarded-host"], "admin.company.localhost")

    def test_tcp_service_by_its_name(self):
        proxy = self.proxy("laptop")
        r = proxy.curl("http://web.web01.company:80/bytes/3000000", "-o", "/dev/null", "-w", "%{http_code} %{size_download}")
        self.assertEqual((r.returncode, r.stdout), (0, "200 3000000"), r.stderr)
        r = proxy.curl("http://web.web01.company:12345/headers")  # the port does not matter
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("malai-client-id52", dict(json.loads(r.stdout)))  # bytes as they are: no HTTP front

    def test_the_answer_comes_before_a_service_that_speaks_first(self):
        proxy = self.proxy("laptop")
        host, port = proxy.address.split(":")
        with socket.create_connection((host, int(port)), 10) as s:
            s.settimeout(10)
            s.sendall(GREETING + by_name("banner.web01.company", 22))
            data = b""
            while len(data) < 2 + 10 + 6:
                chunk = s.recv(100)
                self.assertTrue(chunk, data)
                data += chunk
        self.assertEqual(data, b"\x05\x00" + socks.reply(socks.SUCCEEDED) + b"hello\n")

    def test_own_front_when_the_daemon_has_none(self):
        proxy = self.proxy("intruder")
        self.assertIn("its own HTTP front", proxy.line)
        r = proxy.curl("http://open.company.localhost/headers")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(dict(json.loads(r.stdout))["malai-client-id52"], self.cluster.ids["intruder"])

    def test_denied_caller_gets_a_failure_reply(self):
        proxy = self.proxy("intruder")
        r = proxy.curl("http://web.web01.company/headers")
        self.assertEqual(r.returncode, 97, r.stderr)  # curl: the proxy refused
        self.assertIn("SOCKS5 connection to web.web01.company. (2)", r.stderr)  # 2: not allowed by ruleset
        err = proxy.stop()
        self.assertRegex(err, r"malai socks: 127\.0\.0\.1:\d+ → web\.web01\.company: permission denied: denied by "
                              r"machine\.web01\.tcp\.web\.allow_from")
        self.assertNotIn("Traceback", err)

    def test_only_malai_names(self):
        proxy = self.proxy("laptop")
        for url, args in ((f"http://127.0.0.1:{self.front['laptop']}/", ["--socks5", proxy.address]),
                          ("http://example.com/", []), ("http://web.nowhere.company/", [])):
            r = subprocess.run(["curl", "-sS", "--max-time", "30", "--socks5-hostname", proxy.address, *args, url],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 97, (url, r.stderr))
        err = proxy.stop()
        self.assertIn("an IP address; only malai names are served", err)
        self.assertIn("example.com:80: not a malai name; only malai names are served", err)
        self.assertIn("cluster company has no machine 'nowhere'", err)

    def test_ssh_dynamic_forwarding(self):
        """``malai ssh -N -D`` is the proxy alone; ``-D`` with a session lives as long as the session."""
        env = dict(os.environ, MALAI_HOME=str(self.homes["laptop"].root))
        port = free_port()
        alone = subprocess.Popen([MALAI, "ssh", "-N", "-D", f"127.0.0.1:{port}", "web01.company"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: alone.poll() is None and alone.kill())
        self.assertIn(f"SOCKS5 proxy on 127.0.0.1:{port}", alone.stdout.readline())
        r = subprocess.run(["curl", "-sS", "--max-time", "30", "-x", f"socks5h://127.0.0.1:{port}",
                            "http://web.web01.company/bytes/10"], capture_output=True, timeout=60)
        self.assertEqual((r.returncode, r.stdout), (0, b"z" * 10), r.stderr)
        alone.send_signal(signal.SIGINT)
        self.assertEqual(alone.wait(30), 0)

        port = free_port()
        session = subprocess.Popen([MALAI, "ssh", "-D", str(port), "web01.company", "cat"], env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: session.poll() is None and session.kill())
        wait_for(lambda: _accepts(port), 30, "the session's SOCKS proxy")
        r = subprocess.run(["curl", "-sS", "--max-time", "30", "-x", f"socks5h://localhost:{port}",
                            "http://admin.company.localhost/bytes/10"], capture_output=True, timeout=60)
        self.assertEqual((r.returncode, r.stdout), (0, b"z" * 10), r.stderr)
        out, err = session.communicate(b"the session's own bytes", timeout=30)
        self.assertEqual((session.returncode, out), (0, b"the session's own bytes"), err)
        self.assertFalse(_accepts(port))  # the proxy ended with the session


def _banner(server: socket.socket) -> None:
    """Say hello first, as sshd or a MySQL server does."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"hello\n")


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False
