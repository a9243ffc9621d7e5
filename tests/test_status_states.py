"""Every state `malai status` reports, each produced with a real daemon, and the lock removed
under a live daemon (#16 item 2): nothing may take its socket or call it dead."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.helpers import DaemonHome, is_dead, wait_for

TWISTD = str(Path(sys.executable).with_name("twistd"))


def state(home: DaemonHome):
    r = home.malai("status", "--json")
    return r.returncode, json.loads(r.stdout)


class StatusStateTests(TestCase):
    def setUp(self):
        self.home = DaemonHome(self)
        self.home.ok("cluster", "init", "company")

    def test_not_running_then_running(self):
        code, s = state(self.home)
        self.assertEqual((code, s["state"]), (3, "NOT RUNNING"))
        self.assertEqual((s["home"], s["lock"], s["socket"]),
                         (str(self.home.root), str(self.home.root / "malai.lock"), str(self.home.root / "malai.socket")))
        self.home.start()
        code, s = state(self.home)
        self.assertEqual((code, s["state"], s["pid"]), (0, "RUNNING", self.home.pid()))
        out = self.home.ok("status")
        self.assertIn(f"home {self.home.root}, lock {self.home.root / 'malai.lock'}", out)
        self.assertIn(f"config {self.home.root / 'clusters' / 'company' / 'cluster.toml'}", out)

    def test_starting_is_never_told_to_be_killed(self):
        # A daemon holding the lock whose socket is not there yet: here it answers elsewhere.
        other = self.home.root / "other.socket"
        proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logfile=-", "malai", "--home", str(self.home.root),
                                 "--listen", "tcp:0:interface=127.0.0.1", "--control", f"unix:{other}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (proc.kill(), proc.wait()))
        wait_for(other.exists, what="the daemon's other socket")
        r = self.home.malai("status")
        self.assertEqual(r.returncode, 4, r.stdout)
        self.assertEqual(r.stdout.splitlines()[0], "STARTING")
        self.assertIn(f"the daemon (pid {proc.pid}) started", r.stdout)
        self.assertNotIn("kill", r.stdout)
        code, s = state(self.home)
        self.assertEqual((code, s["state"], s["pid"]), (4, "STARTING", proc.pid))
        r = self.home.malai("rescan")  # it may have read the files already: nothing is said to be applied
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("nothing applied: run `malai rescan` once it answers", r.stderr)

    def test_not_answering(self):
        self.home.start()
        pid = self.home.pid()
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        r = self.home.malai("status")
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertEqual(r.stdout.splitlines()[0], "NOT ANSWERING")
        self.assertIn(f"the daemon (pid {pid}) holds", r.stdout)
        self.assertIn("did not answer within 10s", r.stdout)

    def test_crashed_names_what_is_left_and_malai_daemon_clears_it(self):
        self.home.start()
        pid = self.home.pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: is_dead(pid), what="the daemon to die")
        code, s = state(self.home)
        self.assertEqual((code, s["state"], s["pid"]), (3, "CRASHED", pid))
        self.assertEqual(s["leftovers"], [f"{self.home.root / 'malai.lock'} naming pid {pid}",
                                          str(self.home.root / "malai.socket")])
        self.assertIn("`malai daemon` clears them", s["fix"])
        self.home.start()
        self.assertEqual(state(self.home)[1]["state"], "RUNNING")

    def test_stale_socket(self):
        self.home.start()
        self.home.ok("stop")
        left = socket.socket(socket.AF_UNIX)  # bound, never listening
        left.bind(str(self.home.root / "malai.socket"))
        self.addCleanup(left.close)
        code, s = state(self.home)
        self.assertEqual((code, s["state"]), (3, "STALE"))
        self.assertEqual(s["leftovers"], [str(self.home.root / "malai.socket")])
        self.home.start()
        self.assertEqual(state(self.home)[1]["state"], "RUNNING")

    def test_a_removed_lock_file_leaves_the_daemon_running_and_reachable(self):
        self.home.start()
        pid = self.home.pid()
        (self.home.root / "malai.lock").unlink()  # what an old tutorial said to do
        code, s = state(self.home)
        self.assertEqual((code, s["state"], s["pid"]), (0, "RUNNING", pid))
        self.assertIn("holds no malai.lock", s["warning"])
        r = self.home.malai("daemon", "--listen", "tcp:0:interface=127.0.0.1")
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"already running (pid {pid})", r.stderr)
        proc = subprocess.run([TWISTD, "-n", "--pidfile=", "--logfile=-", "malai", "--home", str(self.home.root),
                               "--listen", "tcp:0:interface=127.0.0.1"], capture_output=True, text=True, timeout=60)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("another daemon answers on", proc.stdout + proc.stderr)
        code, s = state(self.home)
        self.assertEqual((code, s["state"], s["pid"]), (0, "RUNNING", pid))  # its socket is still there
        self.assertIn(f"malai daemon stopped (pid {pid})", self.home.ok("stop"))
        self.assertTrue(is_dead(pid))
        self.assertEqual(state(self.home), (3, {"state": "NOT RUNNING", "home": str(self.home.root),
                                                "lock": str(self.home.root / "malai.lock"),
                                                "socket": str(self.home.root / "malai.socket")}))
