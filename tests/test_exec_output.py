"""A remote command's output on the machine: read in wide chunks, still paused by a slow caller.

Real processes on the real reactor; the link is a StringTransport (what was written is what the
caller would get)."""

import os
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import TestCase

from malai import frames
from malai.acl import Decision
from malai.audit import AuditLog
from malai.peer.execution import READ_SIZE, ExecRequest, ExecSession


def _request(command):
    return ExecRequest("caller", "", "company", command, command, "me", None, None, "/",
                       {"PATH": os.environ["PATH"]}, False, 24, 80, None, Decision(True, "rule", "why"))


def _stdout(written: bytes):
    return [payload for kind, payload in frames.FrameParser().feed(written) if kind == frames.STDOUT]


class ExecOutputTests(TestCase):
    def start(self, command):
        session = ExecSession(reactor, _request(command), AuditLog(Path(self.mktemp()) / "audit.jsonl"))
        transport = StringTransport()
        session.makeConnection(transport)
        self.addCleanup(lambda: session.finished or session.connectionLost(None))
        return session, transport

    @defer.inlineCallbacks
    def until(self, done, bound=20.0):
        deadline = time.monotonic() + bound
        while not done():
            if time.monotonic() > deadline:
                self.fail(f"not done within {bound} s")
            yield task.deferLater(reactor, 0.01, lambda: None)

    @defer.inlineCallbacks
    def test_output_is_read_in_wide_chunks(self):
        """1 MiB of stdout comes in frames of more than Twisted's 8 KiB reads, none over READ_SIZE
        (whose frame fills one DATA frame of the link), every byte in order."""
        data = os.urandom(1 << 20)
        path = Path(self.mktemp()).absolute()  # the command runs in /
        path.write_bytes(data)
        session, transport = self.start(["cat", str(path)])
        yield self.until(lambda: session.finished)
        chunks = _stdout(transport.value())
        self.assertEqual(b"".join(chunks), data)
        self.assertGreater(max(map(len, chunks)), 8192)
        self.assertLessEqual(max(map(len, chunks)), READ_SIZE)
        self.assertEqual(session.exit_code, 0)

    @defer.inlineCallbacks
    def test_a_paused_caller_pauses_the_child(self):
        """While the link is full (its producer paused) not a byte more is read; resumed, all of it comes."""
        session, transport = self.start(["head", "-c", str(4 << 20), "/dev/zero"])
        transport.producer.pauseProducing()
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(session.bytes_out, 0)
        self.assertFalse(session.finished)
        transport.producer.resumeProducing()
        yield self.until(lambda: session.finished)
        self.assertEqual(len(b"".join(_stdout(transport.value()))), 4 << 20)
        self.assertEqual(session.exit_code, 0)
