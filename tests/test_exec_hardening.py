"""Remote commands under hostile or awkward callers: real daemons, the installed `malai`, raw control-socket clients.

Covers issue 13 items 0, 1 and 9 (exec part) and issue 22 item 6 (exec part): output is never dropped on a
non-blocking stdout, command entries run exactly what the config says, malformed session parameters and
frames get a short refusal in that session only, and a caller that leaves early leaves no traceback."""

import atexit
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai import frames
from malai.acl import Decision
from malai.audit import AuditLog
from malai.cli.remote import Options, request
from malai.config.cluster import parse_cluster, render_cluster
from malai.peer.execution import KILL_GRACE, ExecRequest, ExecSession
from tests.helpers import LoopbackCluster, run_malai, wait_for

MALAI = str(Path(sys.executable).with_name("malai"))


def processes_with(word: str):
    """PIDs whose command line contains ``word``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if word.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


class ExecHardeningTests(TestCase):
    """One cluster for the class (trial has no setUpClass): a manager, web01 and a laptop (the caller)."""

    cluster = None

    def setUp(self):
        if ExecHardeningTests.cluster is None:
            ExecHardeningTests._build()

    @classmethod
    def _build(cls):
        cls.dir = Path(tempfile.mkdtemp(prefix="malai-exech-", dir="/tmp"))
        atexit.register(shutil.rmtree, cls.dir, True)
        (cls.dir / "name").write_text("web01-name\n")
        (cls.dir / "secret").write_text("TOP-SECRET\n")

        def config(ids, ports):
            return (f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["127.0.0.1:{ports["web01"]}"]\n'
                    'allow_from = "laptop"\n'
                    f'\n[machine.web01.command.showname]\ncommand = "cat {cls.dir}/name"\nallow_from = "laptop"\n'
                    '\n[machine.web01.command.say]\ncommand = "echo said"\nallow_from = "laptop"\nargs = true\n'
                    '\n[machine.web01.command.quote]\ncommand = \'echo "[$1]"; cat /dev/null\'\nshell = true\n'
                    'allow_from = "laptop"\n'
                    f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n')

        cls.cluster = LoopbackCluster(("web01", "laptop"), config)
        cls.homes = cls.cluster.homes

    def run_(self, *args, **kw):
        return run_malai(self.homes["laptop"].root, *args, **kw)

    def audit(self):
        path = self.homes["web01"].root / "log" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def log_text(self) -> str:
        return (self.homes["web01"].root / "log" / "malai.log").read_text(errors="replace")

    def assertNoNewTracebacks(self, before: str):
        after = self.log_text()[len(before):]
        for word in ("Traceback", "Unhandled", "AttributeError", "struct.error", "AssertionError"):
            self.assertNotIn(word, after, f"web01's log:\n{after}")

    def raw_exec(self, argv, tty=False, rows=24, cols=80, timeout=None):
        """A control-socket client that says what it likes: (socket, refusal or None, early bytes)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.homes["laptop"].root / "malai.socket"))
        self.addCleanup(sock.close)
        opts = Options()
        opts.tty, opts.timeout = tty, timeout
        early = bytearray()
        sock.settimeout(30)
        return sock, request(sock, "company", "web01", argv, opts, rows, cols, early), bytes(early)

    @staticmethod
    def frames_until_end(sock, early=b""):
        """Every frame until the exit frame or the end of the connection."""
        parser, out = frames.FrameParser(), []
        data = early
        while True:
            for kind, payload in parser.feed(data):
                out.append((kind, payload))
                if kind == frames.EXIT:
                    return out
            data = sock.recv(65536)
            if not data:
                return out

    # -- #13 item 0: the client never drops output -------------------------------------------------
    def big_file(self):
        big = self.dir / "big"
        if not big.exists():
            big.write_bytes(os.urandom(24 * 1024 * 1024))
        return big, big.read_bytes()

    def test_nonblocking_stdout_and_stderr_lose_nothing(self):
        big, data = self.big_file()
        err_size = 4 * 1024 * 1024
        expected = {"out": hashlib.sha256(data).hexdigest(), "err": hashlib.sha256(data[:err_size]).hexdigest()}
        out_r, out_w = socket.socketpair()
        err_r, err_w = socket.socketpair()
        for s in (out_r, out_w, err_r, err_w):
            s.setblocking(False)  # as rsync hands its remote shell: O_NONBLOCK on the shared description
        proc = subprocess.Popen([MALAI, "web01.company", "sh", "-c", f"cat {big}; head -c {err_size} {big} >&2"],
                                stdin=subprocess.DEVNULL, stdout=out_w.fileno(), stderr=err_w.fileno(),
                                env=dict(os.environ, MALAI_HOME=str(self.homes["laptop"].root)))
        out_w.close()
        err_w.close()
        got = {"out": hashlib.sha256(), "err": hashlib.sha256()}
        sizes = {"out": 0, "err": 0}
        sel = selectors.DefaultSelector()
        sel.register(out_r, selectors.EVENT_READ, "out")
        sel.register(err_r, selectors.EVENT_READ, "err")
        deadline = time.monotonic() + 120
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                chunk = key.fileobj.recv(32768)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                got[key.data].update(chunk)
                sizes[key.data] += len(chunk)
            time.sleep(0.0005)  # a slow reader: the client meets EAGAIN over and over
        code = proc.wait(30)
        self.assertEqual((code, sizes["out"], sizes["err"]), (0, len(data), err_size))
        self.assertEqual({k: v.hexdigest() for k, v in got.items()}, expected)

    def test_rsync_pull_through_malai(self):
        if shutil.which("rsync") is None:
            self.skipTest("rsync is not installed")
        big, data = self.big_file()
        dest = Path(self.mktemp())
        dest.mkdir(parents=True)
        r = subprocess.run(["rsync", "-a", "-e", MALAI, f"web01.company:{big}", str(dest)], capture_output=True,
                           timeout=120, env=dict(os.environ, MALAI_HOME=str(self.homes["laptop"].root)))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(hashlib.sha256((dest / "big").read_bytes()).digest(), hashlib.sha256(data).digest())

    # -- #13 item 1: command entries run exactly what the config says -----------------------------
    def test_command_entry_refuses_extra_words(self):
        r = self.run_("web01.company", "showname")
        self.assertEqual((r.stdout, r.returncode), ("web01-name\n", 0))
        r = self.run_("web01.company", "showname", str(self.dir / "secret"))
        self.assertEqual(r.returncode, 126, r.stderr)
        self.assertNotIn("TOP-SECRET", r.stdout)
        self.assertIn("permission denied", r.stderr)
        self.assertIn("machine.web01.command.showname.args", r.stderr)
        denied = [a for a in self.audit() if a["decision"] == "denied"
                  and a["argv"] == ["showname", str(self.dir / "secret")]]
        self.assertEqual(len(denied), 1)
        self.assertIn("command.showname.args", denied[0]["rule"])

    def test_args_true_and_shell_entries(self):
        r = self.run_("web01.company", "say", "a", "b c")
        self.assertEqual((r.stdout, r.returncode), ("said a b c\n", 0))
        r = self.run_("web01.company", "quote", "x; cat /etc/passwd", "y")
        self.assertEqual((r.stdout, r.returncode), ("[x; cat /etc/passwd]\n", 0))

    def test_args_key_round_trips(self):
        text = self.cluster.cm.root.joinpath("clusters", "company", "cluster.toml").read_text()
        config = parse_cluster(text)
        self.assertTrue(config.machines["web01"].commands["say"].args)
        self.assertFalse(config.machines["web01"].commands["showname"].args)
        self.assertEqual(parse_cluster(render_cluster(config)), config)

    def test_denial_does_not_show_other_members(self):
        r = run_malai(self.cluster.cm.root, "web01.company", "id")
        self.assertEqual(r.returncode, 126, r.stderr)
        self.assertIn("permission denied: denied by machine.web01.allow_from", r.stderr)
        self.assertNotIn(self.cluster.ids["laptop"], r.stderr)  # the expanded allow_from stays on web01

    # -- #13 item 9 / #22 item 6: malformed session parameters and frames ------------------------
    def test_bad_timeouts_are_refused_before_anything_runs(self):
        before = self.log_text()
        marker = self.dir / "timeout-marker"
        for value in ("-1", "0", "nan", "inf", "-inf"):
            r = self.run_("--timeout", value, "web01.company", "touch", str(marker))  # the client refuses
            self.assertEqual(r.returncode, 2, (value, r.stderr))
            self.assertIn("timeout must be a positive number of seconds", r.stderr)
            self.assertLess(len(r.stderr), 200, r.stderr)
            sock, refused, _ = self.raw_exec(["touch", str(marker)], timeout=float(value))  # and so does web01
            self.assertEqual(refused[0], 1, value)
            self.assertIn("timeout must be a positive number of seconds", refused[1])
            sock.close()
            self.assertFalse(marker.exists(), value)
        r = self.run_("--timeout", "5", "web01.company", "echo", "fine")
        self.assertEqual((r.stdout, r.returncode), ("fine\n", 0))
        self.assertNoNewTracebacks(before)

    def test_bad_terminal_sizes_and_words_are_refused(self):
        before = self.log_text()
        marker = self.dir / "size-marker"
        for tty, rows, cols in ((True, 70000, 80), (True, 24, -1), (False, 2 ** 40, 80)):
            sock, refused, _ = self.raw_exec(["touch", str(marker)], tty=tty, rows=rows, cols=cols)
            self.assertIsNotNone(refused, (rows, cols))
            self.assertEqual(refused[0], 1)
            self.assertIn("rows and cols must be", refused[1])
            sock.close()
        for argv in (["touch", f"{marker}\x00x"], ["sh\x00", "-c", f"touch {marker}"]):
            sock, refused, _ = self.raw_exec(argv)
            self.assertIsNotNone(refused, argv)
            self.assertIn("NUL", refused[1])
            sock.close()
        self.assertFalse(marker.exists())
        self.assertNoNewTracebacks(before)

    def _bad_frame(self, frame: bytes, tty: bool):
        before = self.log_text()
        word = f"{os.getpid()}.{len(frame)}{int(tty)}"
        sock, refused, early = self.raw_exec(["sh", "-c", f"echo ready; sleep {word}"], tty=tty)
        self.assertIsNone(refused)
        wait_for(lambda: processes_with(f"sleep {word}"), what="the remote sleep")
        sock.sendall(frame)
        got = self.frames_until_end(sock, early)
        errors = [p for k, p in got if k == frames.ERROR]
        self.assertEqual(errors, [b"malformed exec frame"])
        self.assertEqual(json.loads([p for k, p in got if k == frames.EXIT][0])["code"], 126)
        wait_for(lambda: not processes_with(f"sleep {word}"), what="the remote command to be killed")
        self.assertNoNewTracebacks(before)

    def test_window_size_frame_of_wrong_length(self):
        self._bad_frame(frames.encode(frames.WINSIZE, b"\x01"), tty=True)
        self._bad_frame(frames.encode(frames.WINSIZE, b"\x00\x18\x00\x50\x00"), tty=False)

    def test_unknown_frame_kinds_and_bad_signals(self):
        self._bad_frame(frames.encode(b"Z", b"hello"), tty=False)
        self._bad_frame(frames.encode(frames.EXIT, b"{}"), tty=False)
        self._bad_frame(frames.encode(frames.SIGNAL, b"\xffINT"), tty=False)

    def test_oversized_frame(self):
        self._bad_frame(struct.pack(">cI", frames.STDIN, frames.MAX_FRAME + 1), tty=False)

    def test_good_session_after_bad_ones(self):
        self._bad_frame(frames.encode(b"Z"), tty=True)
        r = self.run_("web01.company", "echo", "still", "serving")
        self.assertEqual((r.stdout, r.returncode), ("still serving\n", 0))

    # -- #22 item 6: a caller that leaves early costs no traceback --------------------------------
    def test_caller_leaving_early_leaves_no_traceback_and_no_process(self):
        before = self.log_text()
        words = []
        for tty in (False, True):
            word = f"{os.getpid()}0.{int(tty)}"
            words.append(word)
            sock, refused, _ = self.raw_exec(["sh", "-c", f"trap '' HUP; sleep {word}"], tty=tty)
            self.assertIsNone(refused)
            wait_for(lambda w=word: processes_with(f"sleep {w}"), what="the remote sleep")
            sock.close()
        for word in words:
            wait_for(lambda w=word: not processes_with(f"sleep {w}"), what="the remote command to be killed")
        time.sleep(0.5)
        self.assertNoNewTracebacks(before)


class _Child:
    """What ExecSession uses of a spawned process, around a real ``sleep`` in a group of its own."""

    def __init__(self, popen):
        self.popen, self.pid, self.pipes = popen, popen.pid, {}

    def write(self, data):
        pass

    def closeStdin(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


def _wait_until_stopped(pid, bound=10.0):
    """Wait until the kernel shows process pid stopped (state T in /proc)."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {bound} s")


class _Reactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.children = []

    def spawnProcess(self, proto, executable, args, env=None, path=None, uid=None, gid=None, usePTY=False):
        child = _Child(subprocess.Popen(["sleep", "30"], start_new_session=True))
        self.children.append(child)
        return child


class SessionTimerTests(SynchronousTestCase):
    """The session's timers with a fake clock and a real process group: none outlives the session."""

    def session(self, timeout=None):
        reactor = _Reactor()
        request = ExecRequest("caller", "", "company", ["sleep"], ["sleep", "30"], "me", None, None, "/",
                              {"PATH": os.environ["PATH"]}, False, 24, 80, timeout, Decision(True, "rule", "why"))
        session = ExecSession(reactor, request, AuditLog(Path(self.mktemp()) / "audit.jsonl"))
        transport = StringTransport()
        session.makeConnection(transport)
        child = reactor.children[0]
        self.addCleanup(lambda: (child.popen.poll() is None and child.popen.kill(), child.popen.wait()))
        return reactor, session, transport, child

    def test_caller_gone_then_process_ended_leaves_no_timer(self):
        reactor, session, transport, child = self.session()
        transport.loseConnection()
        session.connectionLost(None)
        self.assertEqual(child.popen.wait(10), -signal.SIGHUP)
        self.assertEqual([c.getTime() for c in reactor.getDelayedCalls()], [KILL_GRACE])
        written = transport.value()
        session.ended(None, signal.SIGHUP)
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertEqual(transport.value(), written)  # nothing written to a link that is gone

    def test_time_out_then_process_ended_leaves_no_timer(self):
        reactor, session, transport, child = self.session(timeout=5)
        reactor.advance(5)
        self.assertEqual(child.popen.wait(10), -signal.SIGTERM)
        session.ended(None, signal.SIGTERM)
        self.assertEqual(reactor.getDelayedCalls(), [])
        parsed = list(frames.FrameParser().feed(transport.value()))
        self.assertEqual(json.loads(parsed[-1][1])["code"], 124)
        self.assertTrue(transport.disconnecting)

    def test_stubborn_group_is_killed_after_the_grace(self):
        reactor, session, transport, child = self.session()
        os.killpg(child.pid, signal.SIGSTOP)  # SIGHUP stays pending: only SIGKILL ends it
        _wait_until_stopped(child.pid)  # else SIGHUP, the lower number, may be taken first
        session.connectionLost(None)
        child.pid = None  # as Twisted does once the leader is reaped, while the group may hold its pipes
        reactor.advance(KILL_GRACE)
        self.assertEqual(child.popen.wait(10), -signal.SIGKILL)
