"""The control socket under callers who leave early, big answers, crowds and huge boxes: real daemons."""

import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from malai import frames
from malai.ampbox import decode_box, encode_box
from tests.helpers import MALAI, DaemonHome, LoopbackCluster, run_malai, short_home, wait_for


def children(pid: int) -> list:
    """The pids of ``pid``'s child processes."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += (task / "children").read_text().split()
        except FileNotFoundError:
            pass
    return found


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def exec_box(argv: list) -> bytes:
    words = b"".join(struct.pack(">H", len(w)) + w.encode() for w in argv)
    return encode_box({b"_command": b"Exec", b"_ask": b"1", b"cluster": b"company", b"machine": b"web01",
                       b"argv": words, b"tty": b"False", b"term": b"xterm", b"rows": b"24", b"cols": b"80"})


class ExecThroughControlTests(TestCase):
    """A manager, web01 and a laptop whose daemon runs the callers' commands on web01.

    trial has no setUpClass: the first test builds the cluster, torn down at exit."""

    cluster = None

    def setUp(self):
        if ExecThroughControlTests.cluster is None:
            def config(ids, ports):
                return (f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["127.0.0.1:{ports["web01"]}"]\n'
                        f'allow_from = "laptop"\n\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n')

            ExecThroughControlTests.cluster = LoopbackCluster(("web01", "laptop"), config)
        self.web01 = self.cluster.homes["web01"]
        self.laptop = self.cluster.homes["laptop"]

    def run_(self, *args, **kw):
        return run_malai(self.laptop.root, *args, **kw)

    def test_caller_leaving_early_leaves_nothing_running(self):
        """Exec then close at once, or while the link is taken, or after the command started:
        web01 ends up with no child and no more descriptors than before (#22 item 1)."""
        self.assertEqual(self.run_("web01.company", "true").returncode, 0)  # spare links in place
        web01, laptop = self.web01.pid(), self.laptop.pid()
        wait_for(lambda: not children(web01), 10, "web01 to have no child")
        before = {web01: fds(web01), laptop: fds(laptop)}
        for delay in (0, 0, 0.01, 0.05, 0.1, 0.3, 0.6):
            for argv in (["sleep", "1000"], []):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(self.laptop.root / "malai.socket"))
                s.sendall(exec_box(argv))
                time.sleep(delay)
                s.close()
        try:
            wait_for(lambda: not children(web01), 10, "web01's commands to end")
        except AssertionError:
            self.fail(f"web01 still runs {len(children(web01))} commands for callers that left")
        try:
            wait_for(lambda: all(fds(pid) <= count for pid, count in before.items()), 10, "descriptors")
        except AssertionError:
            self.fail(f"descriptors before {before}, now {({pid: fds(pid) for pid in before})}")

    def test_a_signal_sent_as_the_command_starts_reaches_it(self):
        """The machine answers an exec stream as soon as it spawned the process, before the child
        made its own process group (setsid): a Ctrl-C sent at once must not be lost."""
        import signal

        from malai.cli.remote import Options, request
        from tests.test_memory import exit_status

        for _ in range(10):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(20)
                sock.connect(str(self.laptop.root / "malai.socket"))
                self.assertIsNone(request(sock, "company", "web01", ["sleep", "60"], Options(), 24, 80))
                sock.sendall(frames.encode(frames.SIGNAL, str(int(signal.SIGINT)).encode()))
                self.assertEqual(exit_status(sock), 128 + signal.SIGINT)

    def test_200_concurrent_sessions(self):
        """200 `malai web01.company true` at once all finish (#13 item 13: 67 of 200 lost to EINVAL)."""
        env = dict(os.environ, MALAI_HOME=str(self.laptop.root))
        procs = [subprocess.Popen([MALAI, "web01.company", "true"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(200)]
        results = [(p.wait(60), p.stderr.read().decode()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        failed = [r for r in results if r[0] != 0]
        self.assertEqual(failed, [], f"{len(failed)} of 200 failed, e.g. {failed[:3]}")

    def test_1000_sessions_at_once(self):
        """1,000 Exec requests on the control socket at once: each runs to its exit status or is
        refused with a plain reason; none is lost."""
        sel = selectors.DefaultSelector()
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(self.laptop.root / "malai.socket"))
            s.sendall(exec_box(["true"]))
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, _Caller())
        outcomes: dict = {}
        deadline = time.monotonic() + 60
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                caller = key.data
                if caller.feed(key.fileobj.recv(65536)):
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    outcomes[caller.outcome] = outcomes.get(caller.outcome, 0) + 1
        self.assertEqual(len(sel.get_map()), 0, "sessions still running after 60 s")
        unclear = {o: n for o, n in outcomes.items() if o != "exit 0" and (
            not o.startswith("refused: ") or any(w in o for w in ("Errno", "Traceback", "Unknown Error")))}
        self.assertEqual(unclear, {}, f"outcomes: {outcomes}")


class _Caller:
    """One raw control connection: the Exec answer, then exec frames up to the exit frame."""

    def __init__(self):
        self.buffer = bytearray()
        self.answered = False
        self.parser = frames.FrameParser()
        self.outcome = "lost"

    def feed(self, data: bytes) -> bool:
        """True once this session is over (``outcome`` says how)."""
        if not data:
            return True
        if not self.answered:
            self.buffer += data
            decoded = decode_box(bytes(self.buffer))
            if decoded is None:
                return False
            answer, used = decoded
            self.answered = True
            if b"_error" in answer:
                self.outcome = "refused: " + answer[b"_error_description"].decode()
                return True
            data = bytes(self.buffer[used:])
        for kind, payload in self.parser.feed(data):
            if kind == frames.EXIT:
                self.outcome = f"exit {json.loads(payload)['code']}"
                return True
        return False


class _Cluster:
    def __init__(self, machines):
        self.machines = machines

    def exec_targets(self):
        return self.machines


class _Root:
    """What the control socket asks of the daemon, for a manager of ``n`` machines that never answered."""

    def __init__(self, n: int):
        self.names = [f"machine-{i:05d}" for i in range(n)]

    def status(self) -> dict:
        error = "no known address for " + "x" * 52 + ": add addrs to the config or pass --addr"
        sync = [{"machine": m, "version": 0, "sync": "error", "last_seen": 0.0, "error": error}
                for m in self.names]
        links = [{"peer": "p" * 52, "path": "tcp:127.0.0.1:7420"} for _ in self.names]
        cluster = {"cluster": "company", "role": "manager", "id52": "c" * 52, "machines": len(self.names),
                   "waiting_for_config": False, "config_version": 1, "publishing": False, "in_sync": 0,
                   "pending": 0, "failing": len(sync), "links": len(links), "peer_links": links, "sync": sync}
        return {"pid": os.getpid(), "version": "0", "uptime": 1.0, "listen": ["tcp:127.0.0.1:7420"],
                "clusters": [cluster], "forwards": [], "http_urls": [], "relay_active": 0, "relay_total": 0,
                "relay_bytes": 0, "tor": "off", "onions": []}

    def cluster(self, alias):
        return _Cluster(self.names)


class BigAnswerTests(TestCase):
    """Answers far past one AMP value's 64 KiB, read by the real CLI (#22 item 3): this process holds
    the daemon lock and serves the control socket with a stand-in for the daemon's state."""

    @inlineCallbacks
    def serve(self, n: int):
        """A home whose lock this process holds and whose control socket it serves as the daemon does."""
        from twisted.internet import reactor

        from malai.control.server import ControlFactory
        from malai.lock import DaemonLock
        from malai.services.listening import ListeningService
        from malai.tap import control_endpoint

        home = short_home(self)
        lock = DaemonLock(home / "malai.lock")
        lock.acquire()
        self.addCleanup(lock.release)
        listening = ListeningService(reactor, control_endpoint(home / "malai.socket"), ControlFactory(_Root(n)))
        listening.startService()
        yield listening.ready
        self.addCleanup(listening.stopService)
        return home

    @inlineCallbacks
    def test_status_of_2000_machines(self):
        home = yield self.serve(2000)
        out, err, code = yield getProcessOutputAndValue(MALAI, ("status", "--json"), env=_env(home))
        self.assertEqual(code, 0, out + err)
        [cluster] = json.loads(out)["clusters"]
        self.assertEqual([m["machine"] for m in cluster["sync"]], _Root(2000).names)
        self.assertEqual(len(cluster["peer_links"]), 2000)
        self.assertEqual(cluster["sync"][-1]["error"], _Root(1).status()["clusters"][0]["sync"][0]["error"])

    @inlineCallbacks
    def test_machines_of_a_big_cluster(self):
        """The stdlib client of fan-out reads a list of machines in several values."""
        home = yield self.serve(10000)
        script = ("import sys; from pathlib import Path; from malai.cli.remote import machines_of; "
                  "print(len(machines_of(Path(sys.argv[1]), 'company')))")
        out, err, code = yield getProcessOutputAndValue(sys.executable, ("-c", script, str(home)), env=_env(home))
        self.assertEqual((code, out), (0, b"10000\n"), err)


class ManagerStatusTests(TestCase):
    """A real manager daemon of 400 machines, none running: once every push failed, its status
    (about 100 KB) is past one AMP value's 64 KiB. 2,000 machines would take the manager minutes to
    start (each machine's config is computed from the whole cluster), hence BigAnswerTests."""

    def test_status_and_rescan_of_a_big_manager(self):
        from malai.identity import Identity

        cm = DaemonHome(self)
        cm.ok("cluster", "init", "company")
        path = cm.root / "clusters" / "company" / "cluster.toml"
        path.write_text(path.read_text() + "".join(
            f'\n[machine.m{i:04d}]\nid52 = "{Identity.generate().id52}"\n' for i in range(400)))
        cm.start()

        def every_push_failed() -> bool:
            r = cm.malai("status", "--json")
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            sync = json.loads(r.stdout)["clusters"][0]["sync"]
            return len(sync) == 400 and all(m["error"] for m in sync)

        wait_for(every_push_failed, 30, "the manager to record 400 failed pushes")
        r = cm.malai("status")
        self.assertEqual((r.returncode, r.stdout.splitlines()[0]), (0, "RUNNING"))
        r = cm.malai("rescan")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("the running daemon rescans", r.stdout)


class NotAnsweringTests(TestCase):
    """A live daemon holds the lock but its socket does not answer: never "not running" (#22 item 3)."""

    def setUp(self):
        from malai.lock import DaemonLock

        self.home = short_home(self)
        lock = DaemonLock(self.home / "malai.lock")
        lock.acquire()
        self.addCleanup(lock.release)
        dead = socket.socket(socket.AF_UNIX)  # bound, never listening: connections are refused
        dead.bind(str(self.home / "malai.socket"))
        os.chmod(self.home / "malai.socket", 0o600)
        self.addCleanup(dead.close)

    def test_status(self):
        r = run_malai(self.home, "status")
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertEqual(r.stdout.splitlines()[0], "NOT ANSWERING")
        self.assertIn(f"the daemon (pid {os.getpid()}) holds", r.stdout)
        self.assertIn("Connection refused", r.stdout)

    def test_rescan_and_cluster_init_fail_loudly(self):
        for args in (("cluster", "init", "company"), ("rescan",)):
            r = run_malai(self.home, *args)
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertNotIn("not running", r.stdout + r.stderr)
            self.assertIn("did not answer", r.stderr)
            self.assertIn("nothing applied: run `malai rescan` once it answers", r.stderr)


class CrowdTests(TestCase):
    """Many callers at once on the control socket (#22 item 3): this process serves it as the daemon does."""

    serve = BigAnswerTests.serve

    @inlineCallbacks
    def test_300_nonblocking_connects_are_all_queued(self):
        home = yield self.serve(1)
        socks, refused = [], 0
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            socks.append(s)
            refused += s.connect_ex(str(home / "malai.socket")) != 0
        for s in socks:
            s.close()
        self.assertEqual(refused, 0, f"{refused} of 300 connects refused")

    @inlineCallbacks
    def test_1500_callers_at_once(self):
        """More than the listen backlog: the client waits for room within a bound."""
        from twisted.internet import reactor

        from malai.control.client import call
        from malai.control.commands import Status

        home = yield self.serve(1)
        results = yield DeferredList([call(reactor, home / "malai.socket", Status) for _ in range(1500)])
        failures = [r.getErrorMessage() for ok, r in results if not ok]
        self.assertEqual(len(failures), 0, f"{len(failures)} of 1500 failed: {set(failures)}")

    def test_the_exec_client_waits_for_room_within_a_bound(self):
        """``malai <machine> cmd`` connects blocking: the kernel holds it while the accept queue is
        full; a daemon that never accepts gets a clear error after CONNECT_TIMEOUT, not a hang."""
        import signal

        from malai.cli import remote

        self.patch(remote, "CONNECT_TIMEOUT", 0.5)
        home = short_home(self)
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(home / "malai.socket"))
        os.chmod(home / "malai.socket", 0o600)
        server.listen(0)
        queued = []
        while True:  # fill the accept queue
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            queued.append(s)
            if s.connect_ex(str(home / "malai.socket")):
                break
        self.addCleanup(lambda: [s.close() for s in [server, *queued]])

        def hung(*_):
            raise AssertionError("connect still waits after 5 s")

        previous = signal.signal(signal.SIGALRM, hung)
        signal.alarm(5)
        try:
            with self.assertRaises(ConnectionError) as caught:
                remote.connect(home)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        self.assertIn("too many callers", str(caught.exception))


class SessionLimitTests(TestCase):
    """Exec sessions past what the daemon's descriptors allow are refused at once, with the reason."""

    def test_sessions_past_the_limit_are_refused(self):
        from twisted.internet.defer import Deferred
        from twisted.internet.error import ConnectionDone
        from twisted.internet.testing import StringTransport
        from twisted.python.failure import Failure

        from malai.control.server import ControlFactory

        class Root:
            class pool:
                open = staticmethod(lambda *args: Deferred())  # a link that is still dialed

            def cluster(self, alias):
                class Cluster:
                    identity = None
                    target = staticmethod(lambda machine: "p" * 52)
                return Cluster()

        factory = ControlFactory(Root(), max_sessions=2)
        conns = []
        for _ in range(3):
            proto = factory.buildProtocol(None)
            proto.makeConnection(StringTransport())
            proto.dataReceived(exec_box(["true"]))
            conns.append(proto)
        answers = [proto.transport.value() for proto in conns]
        self.assertEqual(answers[:2], [b"", b""])  # waiting for their links
        self.assertIn(b"FAILED", answers[2])
        self.assertIn(b"2 sessions at once", answers[2])
        conns[0].connectionLost(Failure(ConnectionDone()))
        late = factory.buildProtocol(None)
        late.makeConnection(StringTransport())
        late.dataReceived(exec_box(["true"]))
        self.assertEqual(late.transport.value(), b"")


class HugeBoxTests(TestCase):
    """#13 item 4 on the control socket: a box of 256 MB is cut off, the daemon stays small and serves."""

    def test_a_huge_box_closes_the_connection(self):
        home = DaemonHome(self)
        home.start()
        pid = home.pid()
        before = rss(pid)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(home.root / "malai.socket"))
        s.settimeout(10)
        value = b"x" * 0xFFFF
        try:
            s.sendall(encode_box({b"_command": b"Status", b"_ask": b"1"})[:-2])  # a box left open
            for i in range(4000):  # 4,000 keys of 64 KiB
                s.sendall(struct.pack(">H", 6) + b"k%05d" % i + struct.pack(">H", len(value)) + value)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except socket.timeout:
            self.fail(f"the daemon stopped reading but kept the connection (RSS {rss(pid) - before} kB more)")
        else:
            self.fail(f"the daemon read a box of 256 MB (RSS {rss(pid) - before} kB more)")
        finally:
            s.close()
        self.assertLess(rss(pid) - before, 32 * 1024, "kB of RSS grown")
        self.assertEqual(home.status()["state"], "RUNNING")


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _env(home: Path) -> dict:
    return dict(os.environ, MALAI_HOME=str(home))
