"""Remote commands end to end: real daemons, the installed `malai`, real processes and a real terminal."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.helpers import LoopbackCluster, run_malai, wait_for

MALAI = str(Path(sys.executable).with_name("malai"))


class ExecTests(TestCase):
    """One cluster for the whole class: a manager, three machines and a laptop (the caller).

    trial has no setUpClass: the first test builds it, and it is torn down at exit."""

    cluster = None

    def setUp(self):
        if ExecTests.cluster is None:
            ExecTests._build()

    @classmethod
    def _build(cls):
        cls.marker = Path(tempfile.mkdtemp(prefix="malai-marker-", dir="/tmp")) / "marker"

        def config(ids, ports):
            text = ""
            for name in ("web01", "web02", "web03"):
                text += (f'\n[machine.{name}]\nid52 = "{ids[name]}"\naddrs = ["127.0.0.1:{ports[name]}"]\n'
                         'allow_from = "laptop"\n'
                         f'\n[machine.{name}.command.greet]\ncommand = "echo hello from {name}"\n'
                         'allow_from = "laptop"\n'
                         f'\n[machine.{name}.command.touch-marker]\ncommand = "touch {cls.marker}"\n'
                         'allow_from = "web02"\n')
            return text + f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'

        cls.cluster = LoopbackCluster(("web01", "web02", "web03", "laptop"), config)
        cls.homes = cls.cluster.homes
        (cls.homes["laptop"].root / "malai.toml").write_text('[aliases]\nweb = "web01.company echo"\n')

    def run_(self, *args, **kw):
        return run_malai(self.homes["laptop"].root, *args, **kw)

    def test_streams_and_exit_codes(self):
        r = self.run_("web01.company", "sh", "-c", "echo out; echo err >&2; exit 3")
        self.assertEqual((r.stdout, r.stderr, r.returncode), ("out\n", "err\n", 3))
        r = self.run_("web01.company", "sh", "-c", "kill -9 $$")
        self.assertEqual(r.returncode, 128 + 9)
        r = self.run_("web01.company", "sh", "-c", "kill -TERM $$")
        self.assertEqual(r.returncode, 128 + 15)
        r = self.run_("web01.company", "greet")
        self.assertEqual((r.stdout, r.returncode), ("hello from web01\n", 0))
        r = self.run_("web01.company", "no-such-program")
        self.assertEqual(r.returncode, 127)
        self.assertIn("command not found", r.stderr)

    def test_clean_environment(self):
        r = self.run_("web01.company", "env")
        env = dict(line.split("=", 1) for line in r.stdout.splitlines())
        self.assertEqual(set(env) - {"PWD", "SHLVL", "_"}, {"PATH", "HOME", "USER", "LOGNAME", "LANG",
                                                             "MALAI_CLIENT_ID52"})
        self.assertEqual(len(env["MALAI_CLIENT_ID52"]), 52)

    def test_100_mb_through_cat(self):
        data = os.urandom(100 * 1000 * 1000)
        digest = hashlib.sha256(data).hexdigest()
        proc = subprocess.run([MALAI, "web01.company", "cat"], input=data, capture_output=True, timeout=120,
                              env=dict(os.environ, MALAI_HOME=str(self.homes["laptop"].root)))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(hashlib.sha256(proc.stdout).hexdigest(), digest)

    def test_ctrl_c_is_forwarded(self):
        proc = subprocess.Popen(
            [MALAI, "web01.company", "sh", "-c", "trap 'echo got INT; exit 5' INT; echo ready; while :; do sleep 0.1; done"],
            env=dict(os.environ, MALAI_HOME=str(self.homes["laptop"].root)), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(proc.stdout.readline(), b"ready\n")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(out, b"got INT\n")
        self.assertEqual(proc.returncode, 5)

    def test_denied_never_starts(self):
        r = self.run_("web01.company", "touch-marker")
        self.assertEqual(r.returncode, 126)
        self.assertIn("permission denied: denied by machine.web01.command.touch-marker.allow_from", r.stderr)
        self.assertFalse(self.marker.exists())
        r = run_malai(self.homes["web02"].root, "web01.company", "id")
        self.assertEqual(r.returncode, 126)
        audit = [json.loads(line) for line in
                 (self.homes["web01"].root / "log" / "audit.jsonl").read_text().splitlines()]
        denied = [a for a in audit if a["decision"] == "denied"]
        self.assertTrue(any(a["argv"] == ["touch-marker"] and "touch-marker.allow_from" in a["rule"]
                            for a in denied))
        allowed = [a for a in audit if a["decision"] == "allowed" and a["argv"] == ["greet"]]
        for a in allowed:
            self.assertEqual((a["caller_name"], a["exit"]), ("laptop", 0))
            self.assertGreater(a["bytes_out"], 0)

    def test_timeout(self):
        start = time.monotonic()
        r = self.run_("--timeout", "1", "web01.company", "sleep", "30")
        self.assertEqual(r.returncode, 124)
        self.assertLess(time.monotonic() - start, 20)

    def test_alias(self):
        r = self.run_("web", "via", "alias")
        self.assertEqual((r.stdout, r.returncode), ("via alias\n", 0))

    def test_errors(self):
        r = self.run_("nope.company", "true")
        self.assertEqual(r.returncode, 2)
        self.assertIn("machines: web01, web02, web03", r.stderr)
        r = self.run_("web01.nocluster", "true")
        self.assertEqual(r.returncode, 2)
        r = self.run_("--bogus", "web01.company")
        self.assertEqual(r.returncode, 2)

    def test_fan_out(self):
        r = self.run_("*.company", "greet")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(sorted(r.stdout.splitlines()), [f"web0{i}: hello from web0{i}" for i in (1, 2, 3)])
        self.assertIn("3 of 3 machines succeeded", r.stderr)
        r = self.run_("--json", "--machines", "web01,web03", "x.company", "sh", "-c", "echo $USER; exit 0")
        records = [json.loads(line) for line in r.stdout.splitlines()]
        self.assertEqual(sorted(rec["machine"] for rec in records if "exit" in rec), ["web01", "web03"])
        r = self.run_("web0[12].company", "sh", "-c", "test $MALAI_CLIENT_ID52 && exit 4")
        self.assertEqual(r.returncode, 1)
        self.assertIn("failed: web01 (exit 4), web02 (exit 4)", r.stderr)

    def test_direct_without_daemon(self):
        home = self.homes["laptop"]
        home.ok("stop")
        try:
            r = home.malai("web02.company", "sh", "-c", "echo direct; exit 7")
            self.assertEqual((r.stdout, r.returncode), ("direct\n", 7))
        finally:
            home.start()

    def test_terminal_through_tmux(self):
        if shutil.which("tmux") is None:
            self.skipTest("tmux is not installed")
        session = f"malai-test-{os.getpid()}"
        env = f"MALAI_HOME={self.homes['laptop'].root}"
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "30",
                        f"env {env} {MALAI} -t web01.company sh; echo exited $?; sleep 30"], check=True)
        self.addCleanup(subprocess.run, ["tmux", "kill-session", "-t", session], capture_output=True)

        def screen():
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True).stdout

        wait_for(lambda: screen().strip().endswith(("#", "$")), what="the remote prompt")
        subprocess.run(["tmux", "send-keys", "-t", session, "tty; stty size; echo $((6*7))", "Enter"], check=True)
        try:
            wait_for(lambda: "42" in screen(), what="the remote shell to answer")
        except AssertionError:
            raise AssertionError("screen:\n" + screen()) from None
        text = screen()
        self.assertIn("/dev/pts/", text)
        self.assertIn("30 100", text)  # the window size reached the remote PTY
        subprocess.run(["tmux", "send-keys", "-t", session, "sleep 30", "Enter"], check=True)
        time.sleep(0.5)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)  # a character, not a signal here
        subprocess.run(["tmux", "send-keys", "-t", session, "echo after-$((1+1))", "Enter"], check=True)
        wait_for(lambda: "after-2" in screen(), what="Ctrl-C to interrupt the remote sleep")
