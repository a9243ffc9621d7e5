"""ssh's ``~.`` escape in a terminal session (issue 19): the scanner, then real keys through a pty
into ``malai -t web01.company cat`` on a loopback cluster."""

import os
import pty
import select
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.cli.remote import Escapes
from tests.helpers import MALAI, LoopbackCluster, run_malai


class EscapesTests(SynchronousTestCase):
    def feed(self, *chunks: bytes, char: bytes = b"~"):
        scanner, sent = Escapes(char), b""
        for chunk in chunks:
            keys, left = scanner.feed(chunk)
            sent += keys
            if left:
                return sent, True
        return sent, False

    def test_tilde_dot_at_the_start_of_a_line_leaves(self):
        self.assertEqual(self.feed(b"~."), (b"", True))  # the very first keys
        self.assertEqual(self.feed(b"ls\r~.rest"), (b"ls\r", True))
        self.assertEqual(self.feed(b"ls\n", b"~", b"."), (b"ls\n", True))  # one key at a time
        self.assertEqual(self.feed(b"x\r%.", char=b"%"), (b"x\r", True))

    def test_elsewhere_it_is_a_key(self):
        self.assertEqual(self.feed(b"a~.b\r"), (b"a~.b\r", False))
        self.assertEqual(self.feed(b"a", b"~", b"."), (b"a~.", False))
        self.assertEqual(self.feed(b"~x~.\r"), (b"~x~.\r", False))  # ~x goes as it is; the line has begun
        self.assertEqual(self.feed(b"~\r~."), (b"~\r", True))

    def test_tilde_tilde_sends_one(self):
        self.assertEqual(self.feed(b"~~.\r"), (b"~.\r", False))
        self.assertEqual(self.feed(b"\r~", b"~", b"~."), (b"\r~~.", False))

    def test_a_paste_passes_whole(self):
        paste = b"x" * 65536 + b"\r" + b"y" * 100
        self.assertEqual(self.feed(paste, b"~."), (paste + b"~.", False))
        self.assertEqual(self.feed(paste + b"\r", b"~."), (paste + b"\r", True))


class EscapeEndToEndTests(TestCase):
    """Keys typed into a pty reach ``malai -t web01.company sh -c 'echo ready; exec cat'``."""

    cluster = None

    def setUp(self):
        if EscapeEndToEndTests.cluster is None:
            EscapeEndToEndTests.cluster = LoopbackCluster(("web01", "laptop"), lambda ids, ports: (
                f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["127.0.0.1:{ports["web01"]}"]\n'
                'allow_from = "laptop"\n'
                f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'))
        self.home = self.cluster.homes["laptop"].root

    def test_tilde_dot_ends_a_terminal_session(self):
        master, slave = pty.openpty()
        proc = subprocess.Popen([MALAI, "-t", "web01.company", "sh", "-c", "echo ready; exec cat"], stdin=slave, stdout=slave, stderr=slave,
                                env=dict(os.environ, MALAI_HOME=str(self.home), TERM="dumb"), start_new_session=True)
        os.close(slave)
        self.addCleanup(os.close, master)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        seen = bytearray()

        def until(text: bytes, seconds: float = 20) -> None:
            deadline = time.monotonic() + seconds
            while text not in seen and time.monotonic() < deadline:
                if select.select([master], [], [], 0.2)[0]:
                    try:
                        seen.extend(os.read(master, 4096))
                    except OSError:  # the client has gone and closed the terminal
                        break
            self.assertIn(text, bytes(seen))

        until(b"ready\r\n")  # raw mode here is set: keys typed before would be flushed
        os.write(master, b"a~.b\r")  # not at the start of a line: a key like any other
        until(b"a~.b\r\na~.b\r\n")  # the remote terminal's echo, then cat's copy
        os.write(master, b"~~x\r")
        until(b"~x\r\n~x\r\n")
        self.assertNotIn(b"~~x", bytes(seen))
        started = time.monotonic()
        os.write(master, b"~.")
        self.assertEqual(proc.wait(10), 255)
        self.assertLess(time.monotonic() - started, 5)
        until(b"malai: ~.: left web01.company")

    def test_without_a_terminal_it_is_plain_input(self):
        r = run_malai(self.home, "web01.company", "cat", input="~.\n~~\n")
        self.assertEqual((r.returncode, r.stdout), (0, "~.\n~~\n"), r.stderr)
