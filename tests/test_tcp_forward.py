"""TCP forwarding end to end: real daemons, a real redis-server, redis-cli and redis-benchmark."""

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from malai.peer.proxy_header import TLV_CLIENT_ID52, TLV_CLIENT_NAME, parse
from tests.helpers import MALAI, LoopbackCluster, free_port, run_malai, short_home, wait_for


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class _Server:
    """A threaded TCP server on loopback: ``handle(conn)`` per connection."""

    def __init__(self, testcase, handle):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()
        testcase.addCleanup(self.sock.close)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            try:
                self.handle(conn)
            except OSError:
                pass  # a stream cut short (the daemons stop at exit): nothing to answer


def _digest_after_eof(conn):
    """Read until the caller half-closes, then answer with the SHA-256 and length of what came.

    It starts reading late, so the machine's buffers fill and the relay is paused when the EOF comes."""
    time.sleep(1)
    data = _recv_all(conn)
    conn.sendall(f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode())


def _proxy_header_echo(conn):
    """Answer with what the PROXY v2 header said."""
    data = b""
    while True:
        data += conn.recv(4096)
        try:
            addresses, tlvs, _ = parse(data)
            break
        except ValueError:
            if len(data) > 4096:
                return
    conn.sendall(json.dumps({"addresses": addresses, "id52": tlvs[TLV_CLIENT_ID52].decode(),
                             "name": tlvs.get(TLV_CLIENT_NAME, b"").decode()}).encode())


class TcpForwardTests(TestCase):
    """db01 exposes redis and test services; laptop may reach them, intruder may not."""

    cluster = None

    def setUp(self):
        if shutil.which("redis-server") is None:
            self.skipTest("redis-server is not installed")
        if TcpForwardTests.cluster is None:
            TcpForwardTests._build(self)

    @classmethod
    def _build(cls, testcase):
        cls.redis_port = free_port()
        redis_dir = short_home(testcase)
        cls.redis = subprocess.Popen(["redis-server", "--port", str(cls.redis_port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(redis_dir)],
                                     stdout=subprocess.DEVNULL)
        wait_for(lambda: cls.redis_cli(cls.redis_port, "PING") == "PONG", what="redis-server")
        cls.digest = _Server(testcase, _digest_after_eof)
        cls.ident = _Server(testcase, _proxy_header_echo)
        cls.down_port = free_port()

        def config(ids, ports):
            return (f'\n[machine.db01]\nid52 = "{ids["db01"]}"\naddrs = ["127.0.0.1:{ports["db01"]}"]\n'
                    f'\n[machine.db01.tcp.redis]\nport = {cls.redis_port}\nallow_from = "laptop"\n'
                    f'\n[machine.db01.tcp.digest]\nport = {cls.digest.port}\nallow_from = "laptop, intruder"\n'
                    f'\n[machine.db01.tcp.ident]\nport = {cls.ident.port}\nallow_from = "laptop"\n'
                    'proxy_protocol = true\n'
                    f'\n[machine.db01.tcp.down]\nport = {cls.down_port}\nallow_from = "laptop"\n'
                    f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'
                    f'\n[machine.intruder]\nid52 = "{ids["intruder"]}"\n')

        cls.cluster = LoopbackCluster(("db01", "laptop", "intruder"), config)
        cls.homes = cls.cluster.homes
        import atexit

        atexit.register(cls.redis.kill)

    @staticmethod
    def redis_cli(port, *args) -> str:
        r = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30)
        return r.stdout.strip()

    def forward(self, home_name: str, service: str) -> int:
        """Add a forward on ``home_name`` to ``service``.db01.company; its local port."""
        port = free_port()
        name = f"{service}{port}"
        home = self.homes[home_name]
        home.ok("service", "add", "tcp", name, f"127.0.0.1:{port}", f"{service}.db01.company")
        self.addCleanup(home.malai, "service", "remove", name)
        return port

    def test_redis_cli_and_benchmark(self):
        port = self.forward("laptop", "redis")
        self.assertEqual(self.redis_cli(port, "PING"), "PONG")
        self.assertEqual(self.redis_cli(port, "SET", "malai", "forwarded"), "OK")
        self.assertEqual(self.redis_cli(self.redis_port, "GET", "malai"), "forwarded")
        r = subprocess.run(["redis-benchmark", "-p", str(port), "-n", "2000", "-c", "20", "-t", "ping,set,get",
                            "-q"], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.count("requests per second"), 4, r.stdout)  # PING_INLINE, PING_MBULK, SET, GET
        status = self.homes["laptop"].status()
        [row] = [f for f in status["forwards"] if f["local"].endswith(f":{port}")]
        self.assertGreaterEqual(row["total"], 3 + 20)  # redis-cli thrice, then the benchmark's clients

    def test_denied_caller_never_reaches_redis(self):
        """intruder may reach db01 (its digest service), so it asks; db01 refuses redis."""
        before = self._connections_received()
        port = self.forward("intruder", "redis")
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(20)
            s.sendall(b"PING\r\n")
            self.assertEqual(self._recv_or_reset(s), b"")
        # the INFO calls themselves are the only connections redis saw
        self.assertEqual(self._connections_received(), before + 1)
        log = (self.homes["intruder"].root / "log" / "malai.log")
        wait_for(lambda: "denied by machine.db01.tcp.redis.allow_from" in log.read_text(), what="the reason logged")
        self.assertNotIn(self.cluster.ids["laptop"], log.read_text())  # the rule, not who else may
        audit = [json.loads(line) for line in (self.homes["db01"].root / "log" / "audit.jsonl").read_text().splitlines()]
        self.assertTrue(any(a.get("tcp") == "redis" and a["decision"] == "denied" and a["caller"] ==
                            self.cluster.ids["intruder"] for a in audit))

    def _connections_received(self) -> int:
        info = self.redis_cli(self.redis_port, "INFO", "stats")
        return int(info.split("total_connections_received:")[1].split()[0])

    @staticmethod
    def _recv_or_reset(s) -> bytes:
        try:
            return s.recv(100)
        except ConnectionResetError:
            return b""

    def test_upstream_down_closes_at_once(self):
        port = self.forward("laptop", "down")
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(20)
            self.assertEqual(self._recv_or_reset(s), b"")
        self.assertLess(time.monotonic() - start, 10)  # well before any connect timeout
        log = self.homes["laptop"].root / "log" / "malai.log"
        wait_for(lambda: f"cannot connect to 127.0.0.1:{self.down_port}" in log.read_text(),
                 what="the reason in the caller's log")

    def test_half_close_and_bulk(self):
        port = self.forward("laptop", "digest")
        data = os.urandom(20 * 1000 * 1000)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(60)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the upstream only answers after this EOF reaches it
            answer = _recv_all(s)
        self.assertEqual(answer.decode(), f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")

    def test_proxy_protocol_carries_the_caller(self):
        port = self.forward("laptop", "ident")
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(20)
            answer = json.loads(_recv_all(s))
        self.assertEqual(answer["id52"], self.cluster.ids["laptop"])
        self.assertEqual(answer["name"], "laptop")
        self.assertEqual(answer["addresses"][0], "127.0.0.1")
        self.assertEqual(answer["addresses"][3], self.ident.port)

    def test_service_commands(self):
        home = self.homes["laptop"]
        config = home.root / "malai.toml"
        config.write_text("# my forwards\n[aliases]\nr = \"db01.company redis-cli\"  # keep me\n")
        port = free_port()
        home.ok("service", "add", "tcp", "cache", f"127.0.0.1:{port}", "redis.db01.company")
        self.assertIn("# keep me", config.read_text())
        self.assertEqual(self.redis_cli(port, "PING"), "PONG")
        listed = json.loads(home.ok("service", "list", "--json"))
        [row] = [r for r in listed if r["name"] == "cache"]
        self.assertEqual((row["remote"], row["local"], row["active"]), ("redis.db01.company", f"127.0.0.1:{port}", 0))
        r = home.malai("service", "add", "tcp", "cache", "127.0.0.1:1", "redis.db01.company")
        self.assertEqual(r.returncode, 1)
        self.assertIn("already a forward tcp.cache", r.stderr)
        r = home.malai("service", "add", "tcp", "bad", "localhost", "redis.db01")
        self.assertEqual(r.returncode, 2)
        home.ok("service", "remove", "cache")
        self.assertIn("# my forwards", config.read_text())
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port)).close()
        r = home.malai("service", "remove", "cache")
        self.assertIn("no forward 'cache'", r.stderr)

    def test_forward_in_the_foreground(self):
        port = free_port()
        proc = subprocess.Popen([MALAI, "forward", "redis.db01.company", f"127.0.0.1:{port}"],
                                env=dict(os.environ, MALAI_HOME=str(self.homes["laptop"].root)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        self.assertIn(f"forwarding 127.0.0.1:{port} → redis.db01.company", proc.stdout.readline())
        self.assertEqual(self.redis_cli(port, "PING"), "PONG")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(30), 0)
        r = run_malai(self.homes["laptop"].root, "forward", "redis.nowhere.company")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no machine 'nowhere'", r.stderr)

    def test_scale_and_no_leaks(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard < 4096:
            self.skipTest(f"the descriptor limit ({hard}) is too low for 1,000 connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        port = self.forward("laptop", "redis")
        daemons = {name: self.homes[name].pid() for name in ("laptop", "db01")}

        def concurrent(n):
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
            try:
                for s in socks:
                    s.settimeout(60)
                    s.sendall(b"PING\r\n")
                for s in socks:
                    self.assertEqual(s.recv(100), b"+PONG\r\n")
            finally:
                for s in socks:
                    s.close()

        concurrent(1000)  # 1,000 held open at once, each answered
        wait_for(lambda: self._active(port) == 0, 60, "the 1,000 streams to close")
        before = {name: _usage(pid) for name, pid in daemons.items()}
        for _ in range(100):
            concurrent(100)
        wait_for(lambda: self._active(port) == 0, 60, "the 10,000 streams to close")
        for name, pid in daemons.items():
            wait_for(lambda p=pid, n=name: _usage(p)[0] <= before[n][0], 30, f"{name}'s descriptors to settle")
            fds, rss = _usage(pid)
            self.assertLessEqual(rss, before[name][1] + 16 * 1024 * 1024, f"{name}'s memory grew")

    def _active(self, port) -> int:
        [row] = [f for f in self.homes["laptop"].status()["forwards"] if f["local"].endswith(f":{port}")]
        return row["active"]


def _usage(pid):
    """(open descriptors, resident bytes) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(status.split("VmRSS:")[1].split()[0]) * 1024
    return fds, rss
