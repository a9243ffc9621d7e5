"""A fuzz burst at a real daemon: its peer port (as a member with no rights) and its control socket.

Each peer link (HTTP/2, as ``RawTLS`` speaks it) first opens streams drawn from a seeded generator
(any kind, target and headers, ``malai-exec`` JSON of any shape), each of which must be refused
or reset, then sends boxes on its control stream, as each control connection does: well-formed
commands with arguments of any bytes, boxes with wrong or missing keys, and raw bytes. The daemon
must close the offending connections (one log line each, no traceback), keep serving, give its
descriptors back, stay within a bounded memory growth, and stop when asked.
"""

import json
import random
import struct
import time

from twisted.trial.unittest import TestCase

from malai.ampbox import encode_box
from tests.helpers import wait_for
from tests.test_link_hardening import Manager, RawTLS, closed, fd_count, refusals, rss_kib, send_until_closed

PEER_COMMANDS = [b"Hello", b"Ping", b"PushConfig", b"GetConfig", b"PutConfig", b"ConfigHistory",
                 b"OpenExec", b"Unknown"]  # OpenExec: a command of protocol 1, unknown now
#: Stop is left out: it is allowed to stop the daemon.
CONTROL_COMMANDS = [b"Status", b"Rescan", b"Ping", b"Exec", b"Machines", b"Unknown"]
KEYS = [b"_command", b"_ask", b"_answer", b"_error", b"_error_code", b"protocol", b"features", b"version",
        b"addrs", b"payload", b"argv", b"tty", b"rows", b"cols", b"timeout", b"cluster", b"machine", b"peer",
        b"body", b"body.0", b"base", b"force", b"sha256", b"signature", b"token", b"kind", b"service", b"check"]
VALUES = [b"", b"1", b"0", b"-1", b"nan", b"True", b"False", b"company", b"web01", b"\x00\x01", b"9" * 40]


def fuzz_boxes(rng: random.Random, commands, count: int) -> bytes:
    out = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.15:
            out.append(rng.randbytes(rng.randrange(1, 80)))
            continue
        box = {b"_command": rng.choice(commands), b"_ask": str(rng.randrange(1, 99)).encode()}
        for _ in range(rng.randrange(0, 7)):
            value = rng.choice(VALUES) if rng.random() < 0.6 else rng.randbytes(rng.randrange(0, 30))
            box[rng.choice(KEYS)] = value
        if roll < 0.25:
            del box[b"_command"]
        data = encode_box(box)
        if roll > 0.9:  # a length that lies
            cut = rng.randrange(len(data))
            data = data[:cut] + struct.pack(">H", rng.randrange(65536)) + data[cut + 2:]
        out.append(data)
    return b"".join(out)


STREAM_KINDS = [b"exec", b"tcp", b"http", b"relay", b"relayed", b"control", b"nope"]
TARGETS = [b"company", b"mysql", b"admin", b"", b"x" * 52]
EXEC_FIELDS = ["argv", "tty", "term", "rows", "cols", "timeout", "line", "subsystem", "user"]
FIELD_VALUES = [None, True, False, 0, -1, 2**40, 1.5, "", "id", "xterm", ["id"], ["sh", "-c", "id"], [1], {}]


def fuzz_exec(rng: random.Random) -> bytes:
    """A ``malai-exec`` value: a request with fields of any type, or junk."""
    if rng.random() < 0.2:
        return rng.randbytes(rng.randrange(0, 40)).decode("latin-1").encode()
    fields = {"argv": ["id"], "tty": False, "term": "xterm", "rows": 24, "cols": 80}
    for _ in range(rng.randrange(0, 4)):
        fields[rng.choice(EXEC_FIELDS)] = rng.choice(FIELD_VALUES)
    return json.dumps(fields).encode()


def fuzz_open(rng: random.Random, raw: RawTLS) -> int:
    """Open a stream of a random kind, target and headers; its id."""
    headers = []
    for _ in range(rng.randrange(0, 3)):
        if rng.random() < 0.6:
            headers.append((b"malai-exec", fuzz_exec(rng)))
        else:
            headers.append((rng.choice([b"malai-kind", b"malai-error", b"x-other"]), rng.choice(VALUES)))
    return raw.open(rng.choice(STREAM_KINDS), rng.choice(TARGETS), headers)


class DaemonFuzzTests(TestCase):
    CONNECTIONS = 100

    def test_burst_on_the_peer_port_and_the_control_socket(self):
        m = Manager(self)
        m.link().close()
        time.sleep(0.5)
        fds, rss = fd_count(m.pid), rss_kib(m.pid)
        rng = random.Random(1313)
        broken = 0  # links closed over a malformed HEADERS block
        for _ in range(self.CONNECTIONS):
            raw = m.link()
            try:
                for _ in range(5):
                    answer = raw.answer(fuzz_open(rng, raw))
                    self.assertNotEqual(answer.get(b":status"), b"200", answer)
                    self.assertTrue(b"reset" in answer or answer.get(b"malai-error"), answer)
            except ConnectionError:  # a header HTTP/2 calls malformed (a NUL): the link is gone
                self.assertEqual(raw.h2.goaway, 1, "a GOAWAY other than PROTOCOL_ERROR")
                self.assertTrue(raw.closed_by_peer(), "the link stayed open after GOAWAY")
                broken += 1
            else:
                self.assertEqual(raw.ping()[b"payload"], b"still here")  # refused streams cost the link nothing
                send_until_closed(raw.send, [fuzz_boxes(rng, PEER_COMMANDS, 20)])
            raw.closed_by_peer(0.5)
            raw.close()
            s = m.control()
            send_until_closed(s.sendall, [fuzz_boxes(rng, CONTROL_COMMANDS, 20)])
            s.shutdown(1)
            self.assertTrue(closed(s, 10), "a control connection stayed open after its input ended")
            s.close()
        self.assertEqual(m.home.status()["state"], "RUNNING")
        m.link().close()  # still serving its members
        wait_for(lambda: fd_count(m.pid) <= fds, 15, f"descriptors back to {fds} (now {fd_count(m.pid)})")
        grown = (rss_kib(m.pid) - rss) // 1024
        self.assertLess(grown, 24, f"the daemon grew by {grown} MB")
        log = m.log()
        self.assertNotIn("Traceback", log)
        self.assertLessEqual(len(refusals(log)), 2 * self.CONNECTIONS)
        self.assertLess(broken, self.CONNECTIONS // 2, "most links never got to their boxes")
        start = time.monotonic()
        m.home.ok("stop")
        self.assertLess(time.monotonic() - start, 15)
