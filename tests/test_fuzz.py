"""Fuzzing every wire format and file a peer or a local user can send.

Each test states what the parser owes its caller on *any* input: a result, or
its own error type (which the daemon turns into a refusal or a closed link),
never another exception, and never a buffer that grows past its cap.

The suite runs a few hundred inputs per format; ``make fuzz`` (``MALAI_FUZZ=N``)
runs N per format, with the figures in ``docs/security.md``.
"""

import hashlib
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from malai import ampbox, frames
from malai.config.cluster import parse_cluster
from malai.config.cluster_info import parse_cluster_info
from malai.config.device import parse_device
from malai.config.envelope import Envelope
from malai.config.errors import ConfigError
from malai.config.machine import parse_machine_config
from malai.peer import proxy_header
from malai.peer.relay import Relay

from .helpers import KEYS, cluster_text
from .test_relay_unit import HalfCloseTransport

EXAMPLES = int(os.environ.get("MALAI_FUZZ", "300"))
settings.register_profile("malai", max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("malai")


def chunks(data: bytes, cuts: list) -> list:
    """``data`` split at the given offsets, as a peer's writes may arrive."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def _frame() -> st.SearchStrategy:
    kinds = st.sampled_from([frames.STDIN, frames.EOF, frames.STDOUT, frames.STDERR, frames.SIGNAL,
                             frames.WINSIZE, frames.EXIT, frames.ERROR, frames.DATA, b"?", b"\x00"])
    return st.builds(frames.encode, kinds, st.binary(max_size=64))


#: Well-formed frames, then arbitrary bytes: the parser must read what it can and refuse the rest.
frame_streams = st.builds(lambda good, junk: b"".join(good) + junk, st.lists(_frame(), max_size=8),
                          st.binary(max_size=64))


class FrameFuzz(SynchronousTestCase):
    @given(frame_streams, st.lists(st.integers(0, 1 << 16), max_size=6))
    def test_frames_parse_or_refuse(self, data, cuts):
        parser = frames.FrameParser()
        got = []
        try:
            for part in chunks(data, cuts):
                got.extend(parser.feed(part))
        except ValueError:
            return
        self.assertLessEqual(len(parser._buffer), frames.MAX_FRAME + 5)
        self.assertEqual(b"".join(frames.encode(k, p) for k, p in got), data[:len(data) - len(parser._buffer)])

    @given(st.integers(frames.MAX_FRAME + 1, 2**32 - 1))
    def test_an_oversized_frame_is_refused_from_its_header(self, length):
        parser = frames.FrameParser()
        with self.assertRaises(ValueError):
            list(parser.feed(struct.pack(">cI", frames.STDIN, length)))


class RelayFuzz(SynchronousTestCase):
    """Relay frames from a peer: bytes reach the plain side, or the stream ends; nothing raises."""

    @given(frame_streams, st.lists(st.integers(0, 1 << 16), max_size=6))
    def test_relay_frames(self, data, cuts):
        relay = Relay("fuzz")
        plain, link = HalfCloseTransport(), HalfCloseTransport()
        relay.plain.makeConnection(plain)
        relay.link.makeConnection(link)
        for part in chunks(data, cuts):
            if link.disconnecting:
                break
            relay.link.dataReceived(part)
        relay.link.connectionLost(Failure(ConnectionError("fuzz")))
        relay.plain.connectionLost(Failure(ConnectionError("fuzz")))


class ProxyHeaderFuzz(SynchronousTestCase):
    @given(st.binary(max_size=300))
    def test_any_bytes(self, data):
        self._parse(data)

    @given(st.binary(max_size=60), st.sampled_from([0x00, 0x11, 0x21, 0x31, 0xFF]), st.integers(-2, 2))
    def test_signature_then_junk(self, body, family, slack):
        length = max(0, len(body) + slack)
        self._parse(proxy_header.SIGNATURE + struct.pack(">BBH", 0x21, family, length) + body)

    def _parse(self, data):
        try:
            addresses, tlvs, end = proxy_header.parse(data)
        except ValueError:
            return
        self.assertLessEqual(end, len(data))


class AmpBoxFuzz(SynchronousTestCase):
    """The CLI's stdlib box codec reads what the daemon sends: a box, or 'not yet'."""

    @given(st.binary(max_size=200))
    def test_any_bytes(self, data):
        decoded = ampbox.decode_box(data)
        if decoded is not None:
            box, used = decoded
            self.assertLessEqual(used, len(data))

    @given(st.dictionaries(st.binary(min_size=1, max_size=255), st.binary(max_size=300), max_size=5))
    def test_round_trip(self, box):
        encoded = ampbox.encode_box(box)
        self.assertEqual(ampbox.decode_box(encoded + b"rest"), (box, len(encoded)))


# -- config files and envelopes ---------------------------------------------------------------

def _mutations(text: str) -> st.SearchStrategy:
    """``text`` with a slice replaced by arbitrary characters: mostly-valid TOML, the hard case."""
    return st.builds(lambda at, length, junk: text[:at] + junk + text[at + length:],
                     st.integers(0, len(text)), st.integers(0, 40), st.text(max_size=40))


SAMPLES = {
    "cluster": (parse_cluster, cluster_text()),
    "device": (parse_device, '[http]\nlisten = "127.0.0.1:8080"\n[tcp.db]\nlocal = "127.0.0.1:3306"\n'
                             'remote = "mysql.db01.company"\n[aliases]\nweb = "web01.company ps aux"\n'),
    "cluster_info": (parse_cluster_info, f'id52 = "{KEYS["cm"].id52}"\naddrs = ["127.0.0.1:7420"]\n'),
}


class ConfigFuzz(SynchronousTestCase):
    """Any text gives a config or a ConfigError naming its problems; nothing else."""

    def _parse(self, parse, text):
        try:
            parse(text)
        except ConfigError as e:
            self.assertTrue(e.problems)

    @given(st.sampled_from(sorted(SAMPLES)), st.data())
    def test_mutated_files(self, kind, data):
        parse, text = SAMPLES[kind]
        self._parse(parse, data.draw(_mutations(text)))

    @given(st.sampled_from(sorted(SAMPLES) + ["machine"]), st.text(max_size=200))
    def test_any_text(self, kind, text):
        parse = parse_machine_config if kind == "machine" else SAMPLES[kind][0]
        self._parse(parse, text)


class EnvelopeFuzz(SynchronousTestCase):
    """A forged or altered envelope gets a reason; only the manager's seal passes."""

    manager, machine = KEYS["cm"], KEYS["web01"].id52

    @given(st.text(max_size=100), st.integers(-2**63, 2**63 - 1), st.binary(max_size=80))
    def test_forged(self, body, version, signature):
        forged = Envelope(self.manager.id52, self.machine, version, hashlib.sha256(body.encode()).hexdigest(),
                          body, signature)
        self.assertIsNotNone(forged.problem(self.manager.id52, self.machine))

    @given(st.text(max_size=100), st.integers(0, 2**31), st.sampled_from(["body", "version", "machine"]))
    def test_altered(self, body, version, field):
        sealed = Envelope.seal(self.manager, self.machine, version, body)
        self.assertIsNone(sealed.problem(self.manager.id52, self.machine))
        altered = {"body": lambda e: Envelope(e.cluster, e.machine, e.version, e.sha256, e.body + "x", e.signature),
                   "version": lambda e: Envelope(e.cluster, e.machine, e.version + 1, e.sha256, e.body, e.signature),
                   "machine": lambda e: Envelope(e.cluster, KEYS["db01"].id52, e.version, e.sha256, e.body,
                                                 e.signature)}[field](sealed)
        self.assertIsNotNone(altered.problem(self.manager.id52, self.machine))
