"""Log levels (#16 item 6): --log-level on malai daemon and twistd malai, MALAI_LOG, and malai logs,
with a machine whose heartbeats to its manager are logged at debug level."""

import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.cli.logs import selected
from tests.helpers import MALAI, DaemonHome, wait_for

DEBUG = "#debug] company: heartbeat to the manager answered"


class Pair:
    """A manager (heartbeat = 1) and web01, which is not started."""

    def __init__(self, testcase):
        self.cm, self.web01 = DaemonHome(testcase), DaemonHome(testcase)
        out = self.cm.ok("cluster", "init", "company")
        cm_id52 = out.split("manager ID52: ")[1].split()[0]
        config = self.cm.root / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text().replace('cluster_name = "company"\n',
                                                     'cluster_name = "company"\nheartbeat = 1\n'))
        self.cm.start()
        out = self.web01.ok("machine", "init", cm_id52, "company", "--addr", self.cm.peer_addr(), "--name", "web01")
        with open(config, "a") as f:
            f.write(f'\n[machine.web01]\nid52 = "{out.split("machine ID52: ")[1].split()[0]}"\n')
        self.cm.ok("rescan")
        self.log = self.web01.root / "log" / "malai.log"

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class LevelTests(TestCase):
    def test_log_level_flag_environment_and_default(self):
        p = Pair(self)
        p.web01.ok("daemon", "--log-level", "debug", "--listen", "tcp:0:interface=127.0.0.1")
        wait_for(lambda: p.log_text().count(DEBUG) >= 2, 15, "debug lines")
        p.web01.ok("stop")
        p.log.unlink()
        p.web01.ok("daemon", "--listen", "tcp:0:interface=127.0.0.1")  # info by default
        wait_for(lambda: "linked to the manager" in p.log_text(), 15, "the link")
        time.sleep(2.5)  # two heartbeats
        self.assertNotIn("#debug]", p.log_text())
        p.web01.ok("stop")
        p.log.unlink()
        p.web01.ok("daemon", "--listen", "tcp:0:interface=127.0.0.1", env={"MALAI_LOG": "debug"})
        wait_for(lambda: DEBUG in p.log_text(), 15, "debug lines from MALAI_LOG")
        # malai logs: the level, the last lines, following
        out = p.web01.ok("logs", "--level", "info", "-n", "0")
        self.assertIn("linked to the manager", out)
        self.assertNotIn("#debug]", out)
        self.assertIn(DEBUG, p.web01.ok("logs"))
        self.assertEqual(len(p.web01.ok("logs", "-n", "3").splitlines()), 3)
        follow = subprocess.Popen([MALAI, "logs", "-f", "-n", "1"], env=dict(os.environ, MALAI_HOME=str(p.web01.root)),
                                  stdout=subprocess.PIPE, text=True)
        self.addCleanup(follow.stdout.close)
        try:
            seen = 0
            for line in follow.stdout:  # one line from before, then the heartbeats logged since
                seen += DEBUG in line
                if seen == 2:
                    break
        finally:
            follow.terminate()
            follow.wait(10)

    def test_twistd_log_level(self):
        p = Pair(self)
        twistd = str(Path(sys.executable).with_name("twistd"))
        proc = subprocess.Popen([twistd, "-n", "--pidfile=", "--logger=malai.logs.text_observer", "malai",
                                 "--home", str(p.web01.root), "--listen", "tcp:0:interface=127.0.0.1",
                                 "--log-level", "debug"], env=dict(os.environ, MALAI_LOG_FILE="-"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(proc.stdout.close)
        try:
            for line in proc.stdout:
                if DEBUG in line:
                    break
        finally:
            proc.terminate()
            self.assertEqual(proc.wait(30), 0)

    def test_a_word_that_is_no_level_is_refused(self):
        home = DaemonHome(self)
        r = home.malai("daemon", "--log-level", "loud")
        self.assertEqual(r.returncode, 2)
        self.assertIn("invalid log level", r.stderr)
        r = home.malai("daemon", "--listen", "tcp:0:interface=127.0.0.1", env={"MALAI_LOG": "loud"})
        self.assertEqual(r.returncode, 1)
        self.assertIn("MALAI_LOG: 'loud' is not a log level: debug, info, warn, error, critical", r.stderr)
        self.assertEqual(home.malai("status").returncode, 3)

    def test_no_log_yet(self):
        r = DaemonHome(self).malai("logs")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no log at", r.stderr)


class SelectTests(SynchronousTestCase):
    def test_an_event_keeps_its_continuation_lines(self):
        lines = ["t [a#debug] quiet\n", "\tmore quiet\n", "t [a#warn] loud\n", "\tmore loud\n", "t [-] legacy\n"]
        self.assertEqual(list(selected(lines, "warn")), ["t [a#warn] loud\n", "\tmore loud\n"])
        self.assertEqual(list(selected(lines, "info")), lines[2:])
        self.assertEqual(list(selected(lines, "debug")), lines)
