"""The control socket under callers who leave early, big answers, crowds and huge boxes: real daemons."""

import os
import socket
import struct
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from malai.ampbox import encode_box
from tests.helpers import LoopbackCluster, run_malai, wait_for


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
