"""One multiplexed link per peer pair, end to end: real daemons, real sockets, real TLS.

Streams share one TCP connection; the manager reaches a machine that accepts no
connection at all over the link the machine keeps; a stopped reader stalls only
its own stream; ``malai stop`` lets a transfer finish; a blackholed link is
noticed by its PINGs, and the exec client on it exits 255.
"""

import socket
import subprocess
import threading
import time

from twisted.trial.unittest import TestCase

from tests.helpers import MALAI, DaemonHome, LoopbackCluster, free_port, run_malai, short_home, wait_for
from tests.test_tcp_forward import _recv_all, _Server


def _echo(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


def _endless(conn):
    chunk = b"x" * 65536
    while True:
        conn.sendall(chunk)


def _slowly_10_mb(conn):
    """10 MiB over about two seconds, then close."""
    for _ in range(20):
        conn.sendall(b"y" * (512 * 1024))
        time.sleep(0.1)


class _Forever:
    """A stand-in test case for servers that live as long as the class's cluster."""

    def addCleanup(self, *args):
        pass


def tcp_connections(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to local port ``port``."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", "dport", f"= :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return sum(f"pid={pid}," in line for line in out.splitlines())


class OneLinkTests(TestCase):
    """db01 serves echo, endless and slow; laptop and the manager may reach them; web01
    listens on a UNIX socket only, so nobody can connect to it."""

    cluster = None

    def setUp(self):
        if OneLinkTests.cluster is None:
            OneLinkTests._build(self)
        self.homes = self.cluster.homes

    @classmethod
    def _build(cls, testcase):
        cls.echo, cls.endless, cls.slow = (_Server(_Forever(), f) for f in (_echo, _endless, _slowly_10_mb))

        def config(ids, ports):
            text = f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'
            text += f'\n[machine.web01]\nid52 = "{ids["web01"]}"\nallow_from = "*"\n'
            text += f'\n[machine.web01.tcp.echo]\nport = {cls.echo.port}\nallow_from = "*"\n'
            text += f'\n[machine.db01]\nid52 = "{ids["db01"]}"\naddrs = ["127.0.0.1:{ports["db01"]}"]\n'
            for name, server in (("echo", cls.echo), ("endless", cls.endless), ("slow", cls.slow)):
                text += f'\n[machine.db01.tcp.{name}]\nport = {server.port}\nallow_from = "*"\n'
            return text

        socket_dir = short_home(testcase)
        cls.cluster = LoopbackCluster(("db01", "laptop", "web01"), config,
                                      listen={"web01": f"unix:{socket_dir}/peers.socket"})

    def forward(self, home_name: str, remote: str) -> int:
        port = free_port()
        name = f"f{port}"
        home = self.cluster.cm if home_name == "manager" else self.homes[home_name]
        home.ok("service", "add", "tcp", name, f"127.0.0.1:{port}", remote)
        self.addCleanup(home.malai, "service", "remove", name)
        return port

    def test_fifty_forwarded_connections_share_one_tcp_connection(self):
        port = self.forward("laptop", "echo.db01.company")
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        self.addCleanup(lambda: [s.close() for s in socks])
        for i, s in enumerate(socks):
            s.sendall(b"%d\n" % i)
        for i, s in enumerate(socks):
            s.settimeout(30)
            self.assertEqual(s.recv(100), b"%d\n" % i)
        laptop = self.homes["laptop"].pid()
        self.assertEqual(tcp_connections(laptop, self.cluster.ports["db01"]), 1)
        links = self.homes["laptop"].status()["clusters"][0]["peer_links"]
        [link] = [entry for entry in links if entry["peer"] == "db01"]
        self.assertGreaterEqual(link["streams"], 50)

    def test_the_manager_reaches_a_machine_that_accepts_no_connection(self):
        cm = self.cluster.cm
        r = run_malai(cm.root, "web01.company", "echo", "from the manager")
        self.assertEqual((r.returncode, r.stdout), (0, "from the manager\n"), r.stderr)
        port = self.forward("manager", "echo.web01.company")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"through the kept link")
            self.assertEqual(s.recv(100), b"through the kept link")
        links = cm.status()["clusters"][0]["peer_links"]
        self.assertIn({"peer": "web01", "path": "inbound"}, [{k: e[k] for k in ("peer", "path")} for e in links])

    def test_a_reader_that_stops_stalls_only_its_own_stream(self):
        stalled = socket.create_connection(("127.0.0.1", self.forward("laptop", "endless.db01.company")))
        self.addCleanup(stalled.close)
        stalled.recv(1)  # the stream is open and flowing; from here on nobody reads it
        echo = socket.create_connection(("127.0.0.1", self.forward("laptop", "echo.db01.company")))
        self.addCleanup(echo.close)
        echo.settimeout(5)
        time.sleep(1)  # every buffer on the stalled path is full by now
        slowest = 0.0
        for i in range(200):
            start = time.monotonic()
            echo.sendall(b"ping %d\n" % i)
            self.assertEqual(echo.recv(100), b"ping %d\n" % i)
            slowest = max(slowest, time.monotonic() - start)
        self.assertLess(slowest, 1.0)
        rss = {name: _rss(self.homes[name].pid()) for name in ("laptop", "db01")}
        time.sleep(1)
        for name, before in rss.items():  # the stalled stream holds its window, not more
            self.assertLess(_rss(self.homes[name].pid()), before + 8 * 1024 * 1024, name)

    def test_stop_lets_a_running_transfer_finish(self):
        port = self.forward("laptop", "slow.db01.company")
        received = []
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        reader = threading.Thread(target=lambda: received.append(_recv_all(conn)))
        reader.start()
        time.sleep(0.3)  # the transfer is under way
        laptop = self.homes["laptop"]
        r = laptop.malai("stop")
        self.assertEqual(r.returncode, 0, r.stderr)
        reader.join(30)
        conn.close()
        self.assertEqual(len(received[0]), 10 * 1024 * 1024)
        laptop.start(f"tcp:{self.cluster.ports['laptop']}:interface=127.0.0.1")  # for the other tests
        self.cluster.wait_in_sync()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


class _Blackhole:
    """A TCP proxy to ``target`` that can stop passing bytes either way while keeping its
    sockets open: what a dropped route looks like to both ends."""

    def __init__(self, testcase, target_port: int):
        self.target_port = target_port
        self.holes = False
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets = []
        testcase.addCleanup(self.close)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                while self.holes:
                    time.sleep(0.1)  # hold it: nothing passes, nothing is refused
                sink.sendall(data)
        except OSError:
            return

    def close(self):
        self.server.close()
        for s in self.sockets:
            s.close()


class BlackholeTests(TestCase):
    def test_a_blackholed_link_is_noticed_and_ends_the_exec_client(self):
        cm = DaemonHome(self)
        cm_id52 = cm.ok("cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        cm.start()
        hole = _Blackhole(self, int(cm.peer_addr().rsplit(":", 1)[1]))
        edge = DaemonHome(self)
        out = edge.ok("machine", "init", cm_id52, "company", "--addr", f"127.0.0.1:{hole.port}", "--name", "edge")
        edge_id52 = out.split("machine ID52: ")[1].split()[0]
        path = cm.root / "clusters" / "company" / "cluster.toml"
        path.write_text(path.read_text() + f'\n[machine.edge]\nid52 = "{edge_id52}"\nallow_from = "*"\n')
        cm.ok("rescan")
        edge.start("unix:" + str(short_home(self) / "peers.socket"))  # reachable only over its kept link
        wait_for(lambda: run_malai(cm.root, "edge.company", "true").returncode == 0, 30, "the edge to be linked")
        client = subprocess.Popen([MALAI, "edge.company", "sleep", "120"], env={"MALAI_HOME": str(cm.root),
                                  "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(client.kill)
        time.sleep(1)
        hole.holes = True
        started = time.monotonic()
        code = client.wait(40)
        took = time.monotonic() - started
        self.assertEqual(code, 255, client.stderr.read())
        self.assertLess(took, 25)  # 15 s of silence, then the link goes
        log = (cm.root / "log" / "malai.log").read_text()
        self.assertIn("no answer for", log)


class LinkLimitTests(TestCase):
    def test_max_streams_from_malai_toml_holds_opens_past_it_until_a_stream_ends(self):
        echo = _Server(self, _echo)

        def config(ids, ports):
            return (f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'
                    f'\n[machine.db01]\nid52 = "{ids["db01"]}"\naddrs = ["127.0.0.1:{ports["db01"]}"]\n'
                    f'\n[machine.db01.tcp.echo]\nport = {echo.port}\nallow_from = "laptop"\n')

        cluster = LoopbackCluster(("db01", "laptop"), config)
        self.addCleanup(cluster.close)
        db01 = cluster.homes["db01"]
        db01.ok("stop")
        (db01.root / "malai.toml").write_text("[links]\nmax_streams = 3  # the control stream and two more\n")
        db01.start(f"tcp:{cluster.ports['db01']}:interface=127.0.0.1")
        port = free_port()
        cluster.homes["laptop"].ok("service", "add", "tcp", "echo", f"127.0.0.1:{port}", "echo.db01.company")
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        self.addCleanup(lambda: [s.close() for s in socks])
        for i, s in enumerate(socks):
            s.sendall(b"%d" % i)
        self.assertEqual([socks[0].recv(10), socks[1].recv(10)], [b"0", b"1"])
        socks[2].settimeout(1)
        self.assertRaises(socket.timeout, socks[2].recv, 10)  # its stream waits for a free one
        socks[0].close()
        socks[2].settimeout(10)
        self.assertEqual(socks[2].recv(10), b"2")
