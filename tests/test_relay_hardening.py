"""Relay hardening (#13 items 6 and 7): who may use a relay, how much and for how long;
addresses a peer advertises in ``Hello`` are not trusted blindly.

Unit tests drive the relay's bookkeeping with a ``Clock`` and string transports;
the end-to-end tests run a manager, web01 and a member relay (relay01) as real
daemons on loopback, and play the attacker from this process with real TLS."""

import json

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.identity import Identity
from malai.p2p.dial import MAX_LEARNT, AddressBook, Dialer
from malai.p2p.link import PeerAddress
from malai.p2p.tls import PeerTLS
from malai.peer.commands import RelayOpen, RelayRefused
from malai.peer.links import dial_ready
from malai.peer.protocol import HelloInfo, PeerAMPFactory
from malai.peer.relaying import ATTACH_TIMEOUT, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, MAX_PER_CALLER, Relayer
from malai.peer.responders import ClusterResponder
from malai.peer.splice import SwitchTo
from tests.helpers import DaemonHome, _Cleanups, free_port, wait_for


# -- the relay's bookkeeping, with a clock ----------------------------------------------------------
class _TargetLink:
    """The relay's side of the link a target keeps: records the tokens it is asked to attach."""

    def __init__(self):
        self.tokens = []

    def callRemote(self, command, token):
        self.tokens.append(token)
        return defer.Deferred()


class RelayerLimits(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.relayer = Relayer(self.clock, limit=6, per_caller=4, pending_per_caller=2)
        self.target = _TargetLink()

    def open(self, caller="caller"):
        return self.relayer.open(self.target, caller, "target")

    def splice(self, caller="caller"):
        """A stream of ``caller`` the target attached: (its caller end, caller's transport, target's transport)."""
        d = self.open(caller)
        caller_transport, target_transport = StringTransport(), StringTransport()
        ends = []
        d.addCallback(lambda end: (ends.append(end), end.makeConnection(caller_transport)))
        self.relayer.attach(self.target.tokens[-1], "target").makeConnection(target_transport)
        return ends[0], caller_transport, target_transport

    def test_pending_streams_per_caller(self):
        self.open(), self.open()
        e = self.assertRaises(RelayRefused, self.open)
        self.assertIn("wait for their target", str(e))
        self.assertEqual(len(self.target.tokens), 2)  # the refused one made the target dial nothing
        self.open("someone else")  # other callers are not held up

    def test_streams_per_caller(self):
        streams = [self.splice() for _ in range(4)]
        self.assertEqual(self.relayer.active, 4)
        e = self.assertRaises(RelayRefused, self.open)
        self.assertIn("4 relayed streams", str(e))
        streams[0][0].connectionLost(None)  # one ends: its slot is free again
        self.assertEqual(self.relayer.active, 3)
        self.splice()

    def test_all_streams(self):
        for caller in ("a", "a", "b", "b", "c", "c"):
            self.open(caller)
        self.assertIn("6 streams at most", str(self.assertRaises(RelayRefused, self.open, "d")))

    def test_target_that_never_dials_back(self):
        d = self.open()
        self.clock.advance(ATTACH_TIMEOUT)
        self.assertIn("did not dial back", str(self.failureResultOf(d, RelayRefused).value))
        self.open(), self.open()  # the caller's pending slots are free again

    def test_target_link_closing(self):
        class Closing:
            def callRemote(self, command, token):
                raise amp.ProtocolSwitched("This connection has switched")

        d = self.relayer.open(Closing(), "caller", "target")
        self.assertIn("did not take the request", str(self.failureResultOf(d, RelayRefused).value))
        self.open(), self.open()  # nothing left waiting
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)

    def test_stream_without_handshake_is_cut(self):
        end, caller_transport, target_transport = self.splice()
        self.clock.advance(HANDSHAKE_TIMEOUT - 1)
        self.assertFalse(caller_transport.disconnecting)
        end.dataReceived(b"\x16\x03\x01")  # the caller starts; the target never answers
        self.clock.advance(1)
        self.assertTrue(caller_transport.disconnecting and target_transport.disconnecting)
        self.assertEqual(self.relayer.active, 0)  # the slot is free at once
        self.splice(), self.splice(), self.splice(), self.splice()

    def test_idle_stream_is_cut(self):
        end, caller_transport, target_transport = self.splice()
        end.dataReceived(b"client hello")
        end.other.dataReceived(b"server hello")
        self.clock.advance(HANDSHAKE_TIMEOUT)
        for _ in range(3):  # traffic keeps it open
            self.clock.advance(IDLE_TIMEOUT - 1)
            end.dataReceived(b"x")
            self.clock.advance(1)
        self.assertFalse(caller_transport.disconnecting)
        self.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(caller_transport.disconnecting and target_transport.disconnecting)
        self.assertEqual(self.relayer.summary(), {"active": 0, "total": 1, "bytes": 27})
        self.assertFalse(self.clock.getDelayedCalls())

    def test_ended_stream_leaves_no_timer(self):
        end, _, _ = self.splice()
        end.connectionLost(None)
        end.other.connectionLost(None)
        self.assertEqual(self.relayer.active, 0)
        self.assertFalse(self.clock.getDelayedCalls())


class _Cluster:
    """What the relay responders ask of a cluster."""

    name = "company"

    def __init__(self, relayer, members):
        self._relayer, self._members = relayer, frozenset(members)

    def members(self):
        return self._members

    def manager_id52(self):
        return "manager"

    def relayer(self):
        return self._relayer

    def relay_open(self, caller, target):
        return self._relayer.open(_TargetLink(), caller, target)


class RelayResponders(SynchronousTestCase):
    def setUp(self):
        self.relayer = Relayer(Clock())
        self.cluster = _Cluster(self.relayer, {"member", "target"})

    def responder(self, peer):
        return ClusterResponder(self.cluster, PeerAddress("relay", peer))

    def test_only_members_and_the_manager_may_open(self):
        for outsider in ("named-in-allow-from", "config-editor"):
            e = self.assertRaises(RelayRefused, self.responder(outsider).relay_open, "target")
            self.assertIn("only members", str(e))
        self.assertEqual(len(self.relayer._pending), 0)
        self.responder("member").relay_open("target")
        self.responder("manager").relay_open("target")

    def test_one_relayed_stream_per_link(self):
        link = self.responder("member")
        link.relay_open("target")
        e = self.assertRaises(RelayRefused, link.relay_open, "target")
        self.assertIn("already asked", str(e))
        self.assertRaises(RelayRefused, link.relay_attach, "a-token")
        self.assertEqual(len(self.relayer._pending), 1)  # the target was asked to dial back once


# -- addresses from Hello ---------------------------------------------------------------------------
class AdvertisedAddresses(SynchronousTestCase):
    def test_only_the_host_the_link_came_from(self):
        book = AddressBook()
        kept = book.advertise("p", ["169.254.169.254:80", "0.0.0.0:7420", "192.0.2.5:7421", "evil.example:7420",
                                    "192.0.2.5:notaport", "192.0.2.5:70000", "192.0.2.5:\u00b97420",
                                    "tcp:192.0.2.5:7422",
                                    "relay:" + "a" * 52], "192.0.2.5")
        self.assertEqual(kept, ["tcp:192.0.2.5:7420", "tcp:192.0.2.5:7421", "tcp:192.0.2.5:7422"])
        self.assertEqual(book.hints("p"), kept)

    def test_ipv6_and_unknown_source(self):
        book = AddressBook()
        self.assertEqual(book.advertise("p", ["[::]:7420", "[2001:db8::2]:1"], "2001:db8::1"),
                         ["tcp:[2001:db8::1]:7420"])
        self.assertEqual(book.advertise("q", ["0.0.0.0:7420", ":7420"], ""), [])  # a UNIX socket, Tor: no host

    def test_configured_addresses_are_kept_and_tried_first(self):
        book = AddressBook()
        book.configure("p", ["10.0.0.9:7420"])
        self.assertEqual(book.advertise("p", ["192.0.2.5:7421", "10.0.0.9:7420", "10.0.0.8:7420"], "192.0.2.5"),
                         ["tcp:192.0.2.5:7421", "tcp:10.0.0.9:7420"])
        self.assertEqual(book.hints("p"), ["tcp:10.0.0.9:7420", "tcp:192.0.2.5:7421"])
        book.learn("p", "192.0.2.5:7421")  # a verified link came that way: that goes first
        self.assertEqual(book.hints("p"), ["tcp:192.0.2.5:7421", "tcp:10.0.0.9:7420"])

    def test_capped_and_replaced_by_the_next_hello(self):
        book = AddressBook()
        kept = book.advertise("p", [f"192.0.2.5:{port}" for port in range(1000, 1100)], "192.0.2.5")
        self.assertEqual(len(kept), MAX_LEARNT)
        self.assertEqual(book.hints("p"), kept)
        book.advertise("p", ["192.0.2.5:2000"], "192.0.2.5")
        self.assertEqual(book.hints("p"), ["tcp:192.0.2.5:2000"])
        for port in range(100):
            book.learn("p", f"192.0.2.5:{3000 + port}")
        self.assertEqual(len(book.hints("p")), MAX_LEARNT + 1)  # hints that worked: capped too


# -- end to end: real daemons ---------------------------------------------------------------------
class _Daemons:
    """Cluster ``company`` on loopback: the manager, web01 and relay01 (relay = true) as daemons.
    ``laptop`` is a member whose key this test holds (no daemon); ``alice`` is only named in
    relay01's ``allow_from``; ``editor`` only in ``config_editors``."""

    def __init__(self):
        cleanups = _Cleanups()
        self.laptop, self.alice, self.editor = Identity.generate(), Identity.generate(), Identity.generate()
        self.cm = DaemonHome(cleanups)
        self.cm_id52 = self.cm.ok("cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        self.cm.start()
        self.cm_addr = self.cm.peer_addr()
        self.web, self.relay = DaemonHome(cleanups), DaemonHome(cleanups)
        self.ids = {}
        for home, name in ((self.web, "web01"), (self.relay, "relay01")):
            out = home.ok("machine", "init", self.cm_id52, "company", "--addr", self.cm_addr, "--name", name)
            self.ids[name] = out.split("machine ID52: ")[1].split()[0]
        self.relay_addr = f"127.0.0.1:{free_port()}"
        path = self.cm.root / "clusters" / "company" / "cluster.toml"
        text = path.read_text().replace('# config_editors = "admins"', f'config_editors = "{self.editor.id52}"')
        path.write_text(text + (
            f'\n[machine.web01]\nid52 = "{self.ids["web01"]}"\nallow_from = "laptop"\n'
            f'\n[machine.relay01]\nid52 = "{self.ids["relay01"]}"\naddrs = ["{self.relay_addr}"]\nrelay = true\n'
            f'allow_from = "{self.alice.id52}"\n'
            f'\n[machine.laptop]\nid52 = "{self.laptop.id52}"\n'))
        self.cm.ok("rescan")
        self.web.start()
        self.relay.start(f"tcp:{self.relay_addr.rsplit(':', 1)[1]}:interface=127.0.0.1")

        def in_sync():
            sync = {m["machine"]: m["sync"] for m in self.cm.status()["clusters"][0]["sync"]}
            return sync.get("web01") == sync.get("relay01") == "in sync"

        wait_for(in_sync, 30, "web01 and relay01 to take their config")
        wait_for(lambda: self.relay.status()["clusters"][0]["links"] >= 1, 30, "web01 to keep a link to relay01")

    def web_log(self) -> str:
        return (self.web.root / "log" / "malai.log").read_text()


def status(home: DaemonHome) -> dict:
    r = home.malai("status", "--json")
    if r.returncode:
        raise AssertionError(f"malai status exited {r.returncode}: {r.stderr}")
    return json.loads(r.stdout)


_daemons = None


def daemons() -> _Daemons:
    global _daemons
    if _daemons is None:
        _daemons = _Daemons()
    return _daemons


class _Silent(Protocol):
    """A relayed stream that never starts its TLS handshake."""

    def __init__(self):
        self.got = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.got += data

    def connectionLost(self, reason=None):
        self.lost.callback(None)


@defer.inlineCallbacks
def _until(predicate, timeout: float, what: str):
    """Let the reactor run until ``predicate()`` holds."""
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class RelayAbuseEndToEnd(TestCase):
    timeout = 90

    def setUp(self):
        self.d = daemons()
        self.links = []
        wait_for(lambda: status(self.d.cm)["relay_active"] == 0 and status(self.d.relay)["relay_active"] == 0,
                 20, "the relays to carry nothing")

    def tearDown(self):
        for link in self.links:
            if link.transport is not None:
                link.transport.abortConnection()
        return defer.DeferredList([link.closed for link in self.links])

    @defer.inlineCallbacks
    def dial(self, who: Identity, peer: str, addr: str, advertise=()):
        dialer = Dialer(reactor, PeerTLS([who]), AddressBook())
        link = yield dial_ready(dialer, who, peer, PeerAMPFactory(HelloInfo(addrs=tuple(advertise)), dialer=True),
                                [addr])
        self.links.append(link)
        return link

    @defer.inlineCallbacks
    def relay_open(self, who: Identity, relay: str, addr: str):
        """A stream to web01 through ``relay`` that never starts TLS: its ``_Silent`` end, or the refusal."""
        link = yield self.dial(who, relay, addr)
        silent = _Silent()
        try:
            yield link.callRemote(RelayOpen, _protoToSwitchToFactory=SwitchTo(silent), target=self.d.ids["web01"])
        except RelayRefused as e:
            return e
        return silent

    @defer.inlineCallbacks
    def test_only_members_may_use_a_relay(self):
        d = self.d
        refused = yield self.relay_open(d.editor, d.cm_id52, d.cm_addr)  # a config editor who is no machine
        self.assertIsInstance(refused, RelayRefused)
        self.assertIn("only members", str(refused))
        refused = yield self.relay_open(d.alice, d.ids["relay01"], d.relay_addr)  # named in an allow_from
        self.assertIsInstance(refused, RelayRefused)
        self.assertIn("only members", str(refused))
        opened = yield self.relay_open(d.laptop, d.ids["relay01"], d.relay_addr)  # a member may
        self.assertIsInstance(opened, _Silent)

    @defer.inlineCallbacks
    def test_quota_per_caller_and_handshake_deadline(self):
        d = self.d
        results = []
        for _ in range(MAX_PER_CALLER + 8):  # the target dials back for each: one at a time
            results.append((yield self.relay_open(d.laptop, d.cm_id52, d.cm_addr)))
        opened = [r for r in results if isinstance(r, _Silent)]
        refused = [r for r in results if isinstance(r, RelayRefused)]
        self.assertEqual((len(opened), len(refused)), (MAX_PER_CALLER, 8))
        self.assertIn(f"{MAX_PER_CALLER} relayed streams", str(refused[0]))
        yield _until(lambda: all(s.lost.called for s in opened), HANDSHAKE_TIMEOUT + 5,
                     "the relay to cut streams that never started TLS")
        self.assertFalse(any(s.got for s in opened))
        wait_for(lambda: status(d.cm)["relay_active"] == 0, 5, "the relay's slots to be free")

    @defer.inlineCallbacks
    def test_one_relayed_stream_per_link(self):
        d = self.d
        link = yield self.dial(d.laptop, d.cm_id52, d.cm_addr)
        answers = _Silent()
        link._switchTo(answers)  # from here on this side writes raw boxes and keeps the raw answers
        target = d.ids["web01"].encode()
        link.transport.write(b"".join(amp.AmpBox(_ask=b"%d" % i, _command=b"RelayOpen", target=target).serialize()
                                      for i in range(1, 21)))
        boxes = []

        def parsed():  # the answers (the manager also pushes laptop its config on this link)
            got = amp.parseString(answers.got) if answers.got.endswith(b"\x00\x00") else []
            boxes[:] = [b for b in got if b"_answer" in b or b"_error" in b]
            return len(boxes) == 20

        yield _until(parsed, 10, "an answer to every RelayOpen")
        errors = [b for b in boxes if b.get(b"_error_code") == b"RELAY_REFUSED"]
        self.assertEqual(len(errors), 19)
        self.assertIn(b"already asked", errors[0][b"_error_description"])
        self.assertEqual([b[b"_answer"] for b in boxes if b"_answer" in b], [b"1"])
        self.assertNotIn("refused our attach", d.web_log())  # web01 dialed back once, for the stream it carries


class HelloAddressesEndToEnd(TestCase):
    timeout = 60

    def close(self, link):
        if link.transport is not None:
            link.transport.abortConnection()
        return link.closed

    @defer.inlineCallbacks
    def test_foreign_addresses_are_not_stored_or_dialed(self):
        d = daemons()
        closed = [free_port() for _ in range(MAX_LEARNT + 2)]
        advertise = ["169.254.169.254:80", "192.0.2.77:7420"] + [f"127.0.0.1:{p}" for p in closed]
        dialer = Dialer(reactor, PeerTLS([d.laptop]), AddressBook())
        link = yield dial_ready(dialer, d.laptop, d.cm_id52,
                                PeerAMPFactory(HelloInfo(addrs=tuple(advertise)), dialer=True), [d.cm_addr])
        self.addCleanup(self.close, link)
        state = d.cm.root / "clusters" / "company" / "state.json"

        def stored():
            return json.loads(state.read_text())["machines"].get("laptop", {}).get("addrs")

        yield _until(stored, 10, "the manager to note where laptop listens")
        self.assertEqual(stored(), [f"tcp:127.0.0.1:{p}" for p in closed[:MAX_LEARNT]])
        link.transport.loseConnection()
        yield link.closed
        wait_for(lambda: "laptop" not in {p["peer"] for p in status(d.cm)["clusters"][0]["peer_links"]}, 10,
                 "the manager to drop the link")
        r = d.cm.malai("ping", "laptop.company")
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn(f"127.0.0.1:{closed[0]}", r.stderr)  # it dialed where laptop's link came from…
        self.assertNotIn("169.254.169.254", r.stderr)  # …and nowhere else
        self.assertNotIn("192.0.2.77", r.stderr)
