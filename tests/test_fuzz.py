"""Fuzzing every wire format and file a peer or a local user can send.

Each test states what the parser owes its caller on *any* input: a result, or
its own error type (which the daemon turns into a refusal or a closed link),
never another exception, and never a buffer that grows past its cap.

The suite runs a few hundred inputs per format; ``make fuzz`` (``MALAI_FUZZ=N``)
runs N per format, with the figures in ``docs/security.md``.
"""

import hashlib
import json
import os
import struct

import h11
from h2.exceptions import ProtocolError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from malai import ampbox, frames
from malai.config.cluster import parse_cluster
from malai.config.cluster_info import parse_cluster_info
from malai.config.device import parse_device
from malai.config.envelope import Envelope
from malai.config.errors import ConfigError
from malai.config.machine import parse_machine_config
from malai.config.models import HttpService
from malai.errors import MalaiError
from malai.peer import proxy_header
from malai.peer.commands import PROTOCOL_VERSION
from malai.peer.http_proxy import HttpSession
from malai.peer.protocol import MAX_BOX_BYTES
from malai.peer.relay import Relay
from malai.peer.responders import StreamResponder
from malai.peer.streams import StreamRefused
from malai.services.http_front import _FrontFactory

from .helpers import KEYS, cluster_text
from .test_http_hardening import CALLER, FakeAudit, FakePool, caller_bytes
from .test_link_hardening import accepted_link
from .test_relay_unit import HalfCloseTransport

EXAMPLES = int(os.environ.get("MALAI_FUZZ", "300"))
settings.register_profile("malai", max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("malai")


def chunks(data: bytes, cuts: list) -> list:
    """``data`` split at the given offsets, as a peer's writes may arrive."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def feed(receive, transport, data: bytes, cuts: list) -> None:
    """Hand ``data`` to ``receive`` in pieces, as long as ``transport`` stays open."""
    for part in chunks(data, cuts):
        if transport.disconnecting:
            return
        receive(part)


def _frame() -> st.SearchStrategy:
    kinds = st.sampled_from([frames.STDIN, frames.EOF, frames.STDOUT, frames.STDERR, frames.SIGNAL,
                             frames.WINSIZE, frames.EXIT, frames.ERROR, b"d", b"?", b"\x00"])
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
    """A relayed stream's bytes, in any pieces, then its end (or a cut): every byte reaches the
    plain side as sent, an end half-closes it, nothing raises."""

    @given(st.binary(max_size=300), st.lists(st.integers(0, 1 << 10), max_size=6), st.booleans(),
           st.sampled_from([None, ConnectionDone, ConnectionError]))
    def test_relayed_bytes(self, data, cuts, end, lost):
        relay = Relay("fuzz")
        plain, link = HalfCloseTransport(), HalfCloseTransport()
        with capturedLogs() as events:
            relay.plain.makeConnection(plain)
            relay.link.makeConnection(link)
            feed(relay.link.dataReceived, link, data, cuts)
            if end:
                relay.link.readConnectionLost()
            if lost is not None:
                relay.link.connectionLost(Failure(lost("fuzz")))
            relay.plain.connectionLost(Failure(ConnectionDone("fuzz")))
        self.assertEqual([e for e in events if e.get("log_failure")], [])
        self.assertEqual(plain.value(), data)
        self.assertEqual(plain.write_closed, end)


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


    def test_ports_in_other_scripts_are_refused(self):
        """Found by fuzzing: str.isdigit() takes '¹7420', which int() refuses."""
        with self.assertRaises(ConfigError):
            parse_cluster_info(f'id52 = "{KEYS["cm"].id52}"\naddrs = ["127.0.0.1:\u00b97420"]\n')


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


# -- AMP boxes and stream opens on a peer link (HTTP/2) -------------------------------------------

COMMANDS = [b"Hello", b"Ping", b"PushConfig", b"GetConfig", b"PutConfig", b"ConfigHistory",
            b"OpenExec",  # a command of protocol 1: unknown now
            b"Nope", b""]
KEYS_ = [b"_command", b"_ask", b"_answer", b"_error", b"_error_code", b"_error_description", b"protocol",
         b"features", b"version", b"addrs", b"payload", b"cluster", b"machine", b"sha256", b"signature",
         b"body", b"body.0", b"base", b"force"]


def _box() -> st.SearchStrategy:
    """A box that is mostly well formed: a command, keys it may carry, values of any bytes."""
    values = st.one_of(st.binary(max_size=40), st.sampled_from([b"1", b"2", b"-1", b"nan", b"True", b"\x00\x00",
                                                               b"9" * 30]))
    return st.builds(lambda command, fields: {b"_command": command, b"_ask": b"1", **fields},
                     st.sampled_from(COMMANDS), st.dictionaries(st.sampled_from(KEYS_), values, max_size=6))


def _wire(box: dict) -> bytes:
    return ampbox.encode_box(box)


HELLO = _wire({b"_command": b"Hello", b"_ask": b"h", b"protocol": b"%d" % PROTOCOL_VERSION, b"features": b"",
               b"version": b"fuzz", b"addrs": b""})
box_streams = st.lists(st.one_of(_box().map(_wire), st.binary(max_size=60)), min_size=1, max_size=6).map(b"".join)


def boxes_in(data: bytes) -> list:
    """The AMP boxes ``data`` holds, whole: AssertionError on a partial or broken one."""
    boxes = []
    while data:
        decoded = ampbox.decode_box(data)
        assert decoded is not None, data[:60]
        boxes.append(decoded[0])
        data = data[decoded[1]:]
    return boxes


def no_tracebacks(testcase, events) -> None:
    testcase.assertEqual([e for e in events if e.get("log_failure")], [])
    testcase.assertEqual(testcase.flushLoggedErrors(), [])


class PeerBoxFuzz(SynchronousTestCase):
    """The control stream of an accepted link fed anything, as DATA in any pieces, with or
    without Hello first: whole answers, or one warning and the link closed; never a
    traceback, never more buffered than a box may hold, and the link's streams all gone once
    it is lost."""

    @given(st.booleans(), box_streams, st.lists(st.integers(0, 1 << 12), max_size=4))
    def test_boxes(self, hello, data, cuts):
        peer = accepted_link()
        peer.link.ready.addErrback(lambda f: None)
        amp = peer.link.control
        amp.ready.addErrback(lambda f: None)  # as the daemon does: a refused Hello logs itself
        with capturedLogs() as events:
            for part in chunks((HELLO if hello else b"") + data, cuts):
                if peer.link._gone or peer.control in peer.client.resets:
                    break
                self.assertEqual(peer.client.send_data(peer.control, part), len(part))  # within the window
                peer.exchange()
            peer.clock.advance(2)
            peer.exchange()
            peer.link.connectionLost(Failure(ConnectionError("fuzz")))
            peer.clock.advance(1)
        no_tracebacks(self, events)
        self.assertLessEqual(len([e for e in events if e["log_level"] >= LogLevel.warn]), 1)
        self.assertLessEqual(len(amp._unprocessed), MAX_BOX_BYTES)
        for box in boxes_in(bytes(peer.client.data[peer.control])):
            self.assertTrue(b"_answer" in box or b"_error" in box or b"_command" in box, box)
        self.assertTrue(peer.link.closed.called and amp.closed.called)
        self.assertEqual(peer.link.streams, {})


class FakeCluster:
    """What ``StreamResponder`` asks of a cluster, for a member with no rights on a machine
    with no config yet: every request is checked, then denied."""

    name = "company"
    entry = type("Entry", (), {"machine": None})()
    audit = type("Audit", (), {"record": lambda self, **kw: None})()

    def members(self):
        return []

    def manager_id52(self):
        return KEYS["cm"].id52

    def relayed(self, caller, target):
        raise StreamRefused(f"no relayed link from {target[:60]!r} expected", "RELAY_REFUSED")


def _exec_json() -> st.SearchStrategy:
    """``malai-exec`` values: well-formed requests with fields of any type, and junk."""
    field_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                             st.text(max_size=20), st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=4))
    fields = st.dictionaries(st.sampled_from(["argv", "tty", "term", "rows", "cols", "timeout", "line", "subsystem",
                                              "user", ""]), field_values, max_size=8)
    good = st.fixed_dictionaries({"argv": st.lists(st.text(max_size=8), max_size=3), "tty": st.booleans(),
                                  "term": st.text(max_size=8), "rows": st.integers(-5, 500),
                                  "cols": st.integers(-5, 500)})
    as_json = st.one_of(good, fields, st.lists(st.integers(), max_size=3)).map(json.dumps)
    return st.one_of(as_json, st.text(max_size=60)).map(lambda text: text.encode("utf-8", "surrogatepass"))


_HEADER_NAMES = st.sampled_from([b"malai-exec", b"malai-kind", b"malai-error", b"malai-reason", b":path",
                                 b"x-other", b"Upper", b"a b"])
stream_opens = st.tuples(
    st.sampled_from([b"exec", b"tcp", b"http", b"relay", b"relayed", b"control", b"nope", b"", b"EXEC", b"a" * 40]),
    st.one_of(st.sampled_from([b"company", b"mysql", b"admin", b"", b"a" * 52]), st.binary(max_size=40)),
    st.lists(st.one_of(st.tuples(st.just(b"malai-exec"), _exec_json()),
                       st.tuples(_HEADER_NAMES, st.binary(max_size=30))), max_size=4),
    st.booleans(),  # reset by the opener at once
)


class StreamOpenFuzz(SynchronousTestCase):
    """Stream opens of any kind, target and headers (``malai-exec`` JSON of any shape) from a
    member with no rights: each is refused with a status, a code and a short reason, or reset;
    a malformed HEADERS block costs the link (one warning); nothing is accepted, nothing raises,
    no stream is left behind."""

    @given(st.lists(stream_opens, min_size=1, max_size=8))
    def test_opens(self, opens):
        peer = accepted_link(responder=StreamResponder(FakeCluster()))
        peer.link.ready.addErrback(lambda f: None)
        peer.link.control.ready.addErrback(lambda f: None)
        sent = []
        with capturedLogs() as events:
            for kind, target, headers, reset in opens:
                try:
                    stream_id = peer.client.open(kind, target, headers)
                    if reset:
                        peer.client.conn.reset_stream(stream_id, 8)
                except ProtocolError:
                    continue  # what h2 will not send: malformed on this side already
                sent.append((stream_id, reset))
                peer.exchange()
                if peer.link._gone:
                    break
            peer.clock.advance(1)
            peer.exchange()
        no_tracebacks(self, events)
        warnings = [e for e in events if e["log_level"] >= LogLevel.warn]
        if peer.link._gone:
            self.assertLessEqual(len([e for e in warnings if "closing the link" in e["log_format"]]), 1)
            return
        for stream_id, reset in sent:
            answer = peer.client.answers.get(stream_id)
            if answer is None:
                self.assertTrue(reset or stream_id in peer.client.resets, stream_id)
                continue
            self.assertNotEqual(answer.get(b":status"), b"200", answer)
            self.assertIn(answer.get(b":status"), (b"400", b"403", b"500", b"503"), answer)
            self.assertTrue(answer.get(b"malai-error"), answer)
            self.assertLessEqual(len(answer.get(b"malai-reason", b"")), 400, answer)
        self.assertEqual(list(peer.link.streams), [peer.control])
        self.assertEqual(peer.link._answering, {})


# -- HTTP heads and bodies -----------------------------------------------------------------------

HEADER_NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"Expect",
                b"malai-client-id52", b"malai_client_id52", b"Malai-Client-Name", b"X-Forwarded-For",
                b"Forwarded", b"X-Real-IP", b"Content_Length", b"Transfer_Encoding", b"X-Other"]
HEADER_VALUES = [b"1", b"0", b"-1", b"10", b"99999999999999999999", b"chunked", b"gzip, chunked", b"chunked, gzip",
                 b"close", b"keep-alive", b"content-length", b"transfer-encoding", b"websocket", b"100-continue",
                 b"a.b.localhost", b"", b" x", b"\x7f"]


def _head() -> st.SearchStrategy:
    line = st.builds(lambda m, t, v: m + b" " + t + b" " + v + b"\r\n",
                     st.sampled_from([b"GET", b"POST", b"PUT", b"CONNECT", b"OPTIONS", b"G\x00T", b""]),
                     st.sampled_from([b"/", b"/x?y", b"*", b"http://a/", b"a.b:80", b"", b"/\xff"]),
                     st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""]))
    header = st.builds(lambda n, v: n + b": " + v + b"\r\n", st.sampled_from(HEADER_NAMES),
                       st.one_of(st.sampled_from(HEADER_VALUES), st.binary(max_size=12)))
    return st.builds(lambda first, headers, body: first + b"".join(headers) + b"\r\n" + body,
                     line, st.lists(header, max_size=8), st.binary(max_size=40))


http_streams = st.one_of(st.lists(_head(), min_size=1, max_size=3).map(b"".join), st.binary(max_size=200))


def _heads_sent(upstream) -> list:
    """The headers of each request an upstream read from what it received, parsed as an HTTP/1.1
    server does (so a body that looks like a head stays a body)."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(upstream.transport.value())
    heads = []
    while True:
        try:
            event = server.next_event()
        except h11.RemoteProtocolError:
            return heads
        if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
            return heads
        if isinstance(event, h11.Request):
            heads.append(list(event.headers))
        elif isinstance(event, h11.EndOfMessage):
            server.send(h11.Response(status_code=204, headers=[]))
            server.send(h11.EndOfMessage())
            try:
                server.start_next_cycle()
            except h11.LocalProtocolError:  # the request said close
                return heads


class NoClusters:
    """A daemon in no cluster, for the front: every Host it routes gets a 404."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.clusters: dict = {}

    def cluster(self, name):
        raise MalaiError(f"no cluster {name}")


class FrontStub:
    def port_number(self) -> int:
        return 8080


class LenientTransport(StringTransport):
    """Like a TCP transport, pausing or resuming a closing connection is no error."""

    def pauseProducing(self):
        self.producerState = "paused"

    def resumeProducing(self):
        self.producerState = "producing"


class HttpFuzz(SynchronousTestCase):
    """Any bytes from a caller: a request reaches the upstream unambiguous and unspoofed, or the caller
    gets an HTTP error; never a traceback."""

    @given(http_streams, st.lists(st.integers(0, 1 << 10), max_size=4))
    def test_machine_session(self, data, cuts):
        clock, pool = Clock(), FakePool()
        session = HttpSession(clock, HttpService("admin", 8080), CALLER, pool, FakeAudit(), "rule")
        link = LenientTransport()
        with capturedLogs() as events:
            session.makeConnection(link)
            feed(session.dataReceived, link, data, cuts)
            clock.advance(120)
            session.connectionLost(Failure(ConnectionError("fuzz")))
        self.assertEqual([e for e in events if e.get("log_failure")], [])
        told = {b"malai-client-id52": CALLER.id52.encode(), b"malai-client-machine": CALLER.name.encode(),
                b"malai-client-cluster": CALLER.cluster.encode(), b"x-forwarded-for": CALLER.address.encode()}
        for upstream in pool.upstreams:
            for headers in _heads_sent(upstream):  # as the upstream parses them: smuggled requests too
                names = [name for name, _ in headers]
                self.assertFalse(b"content-length" in names and b"transfer-encoding" in names, headers)
                for name, value in headers:
                    self.assertNotIn(name, (b"forwarded", b"x-real-ip"), headers)
                    if name.replace(b"_", b"-").startswith(b"malai-client-") or name == b"x-forwarded-for":
                        self.assertEqual(value, told.get(name), headers)  # only what the machine says
        answer = caller_bytes(link)
        if answer not in (b"", b"<EOF>"):
            self.assertTrue(answer.startswith(b"HTTP/1.1 "), answer[:40])

    @given(http_streams, st.lists(st.integers(0, 1 << 10), max_size=4))
    def test_front_before_routing(self, data, cuts):
        clock = Clock()
        end = _FrontFactory(NoClusters(clock), FrontStub()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        browser = StringTransport()
        with capturedLogs() as events:
            end.makeConnection(browser)
            feed(end.dataReceived, browser, data, cuts)
            clock.advance(60)
        self.assertEqual([e for e in events if e.get("log_failure")], [])
        answer = browser.value()
        if answer:
            self.assertTrue(answer.startswith(b"HTTP/1.1 "), answer[:40])
