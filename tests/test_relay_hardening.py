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
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.identity import Identity
from malai.p2p.dial import MAX_LEARNT, AddressBook, Dialer
from malai.p2p.link import PeerAddress
from malai.p2p.tls import PeerTLS
from malai.peer.links import dial_ready, link_factory
from malai.peer.protocol import HelloInfo, PeerAMPFactory
from malai.peer.relaying import (
    ATTACH_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_PENDING_PER_CALLER,
    MAX_PER_CALLER,
    Relayer,
)
from malai.peer.responders import StreamResponder
from malai.peer.streams import StreamRefused, StreamRequest
from tests.helpers import DaemonHome, _Cleanups, free_port, wait_for


# -- the relay's bookkeeping, with a clock ----------------------------------------------------------
class _TargetLink:
    """The relay's side of the link a target keeps: each ``relayed`` stream it is asked to open
    waits for the test to answer it."""

    def __init__(self):
        self.opened = []  # (kind, target, protocol, Deferred)
        self.cancelled = []  # the protocols of streams reset before they opened

    def open(self, kind, target, protocol, headers=None):
        d = defer.Deferred(lambda _: self.cancelled.append(protocol))
        self.opened.append((kind, target, protocol, d))
        return d


class _Transport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


class RelayerLimits(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.relayer = Relayer(self.clock, limit=6, per_caller=4, pending_per_caller=2)
        self.target = _TargetLink()

    def open(self, caller="caller"):
        return self.relayer.open(self.target, caller, "target")

    def splice(self, caller="caller"):
        """A relayed link of ``caller`` its target took: (the caller's end, caller's transport, target's transport)."""
        d = self.open(caller)
        kind, who, target_end, taken = self.target.opened[-1]
        self.assertEqual((kind, who), ("relayed", caller))  # a ``relayed`` stream naming the caller
        caller_transport, target_transport = _Transport(), _Transport()
        target_end.makeConnection(target_transport)  # the link connects the stream's protocol…
        taken.callback(target_end)  # …then fires
        caller_end = self.successResultOf(d)
        caller_end.makeConnection(caller_transport)  # the caller's ``relay`` stream is accepted
        return caller_end, caller_transport, target_transport

    def test_pending_links_per_caller(self):
        self.open(), self.open()
        e = self.failureResultOf(self.open(), StreamRefused).value
        self.assertEqual(e.code, "RELAY_REFUSED")
        self.assertIn("2 of your relayed links wait for their target", e.reason)
        self.assertEqual(len(self.target.opened), 2)  # the refused one opened nothing on the target's link
        self.open("someone else")  # other callers are not held up

    def test_links_per_caller(self):
        links = [self.splice() for _ in range(4)]
        self.assertEqual(self.relayer.active, 4)
        e = self.failureResultOf(self.open(), StreamRefused).value
        self.assertIn("you have 4 relayed links", e.reason)
        links[0][0].connectionLost(None)  # one ends: its slot is free again
        self.assertEqual(self.relayer.active, 3)
        self.splice()

    def test_all_links(self):
        for caller in ("a", "a", "b", "b", "c", "c"):
            self.open(caller)
        e = self.failureResultOf(self.open("d"), StreamRefused).value
        self.assertIn("this relay carries 6 links at most", e.reason)

    def test_target_that_never_takes_the_stream(self):
        d = self.open()
        self.clock.advance(ATTACH_TIMEOUT)
        e = self.failureResultOf(d, StreamRefused).value
        self.assertEqual(e.code, "RELAY_REFUSED")
        self.assertEqual(e.reason, f"target did not take the relayed link: no answer within {ATTACH_TIMEOUT:g}s")
        self.assertEqual(len(self.target.cancelled), 1)  # the stream to the target is reset
        self.open(), self.open()  # the caller's pending slots are free again

    def test_target_refuses_or_its_link_closes(self):
        d = self.open()
        self.target.opened[-1][3].errback(StreamRefused("only relays may relay to us", "RELAY_REFUSED"))
        e = self.failureResultOf(d, StreamRefused).value
        self.assertEqual(e.reason, "target did not take the relayed link: only relays may relay to us")

        class Closing:
            def open(self, kind, target, protocol, headers=None):
                return defer.fail(StreamRefused("the link with target is closing", "DRAINING"))

        d = self.relayer.open(Closing(), "caller", "target")
        self.assertIn("the link with target is closing", self.failureResultOf(d, StreamRefused).value.reason)
        self.open(), self.open()  # nothing left waiting
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # the two waiting for their target

    def test_caller_giving_up_resets_the_target_stream(self):
        d = self.open()
        d.cancel()  # the caller reset its ``relay`` stream
        self.assertIn("the caller gave up", self.failureResultOf(d, StreamRefused).value.reason)
        self.assertEqual(len(self.target.cancelled), 1)
        self.assertFalse(self.clock.getDelayedCalls())
        self.open(), self.open()

    def test_link_without_handshake_is_cut(self):
        end, caller_transport, target_transport = self.splice()
        self.clock.advance(HANDSHAKE_TIMEOUT - 1)
        self.assertFalse(caller_transport.disconnecting)
        end.dataReceived(b"\x16\x03\x01")  # the caller starts; the target never answers
        self.clock.advance(1)
        self.assertTrue(caller_transport.aborted and target_transport.aborted)
        self.assertEqual(self.relayer.active, 0)  # the slot is free at once
        self.splice(), self.splice(), self.splice(), self.splice()

    def test_idle_link_is_cut(self):
        end, caller_transport, target_transport = self.splice()
        end.dataReceived(b"client hello")
        end.other.dataReceived(b"server hello")
        self.clock.advance(HANDSHAKE_TIMEOUT)
        for _ in range(3):  # traffic keeps it open
            self.clock.advance(IDLE_TIMEOUT - 1)
            end.dataReceived(b"x")
            self.clock.advance(1)
        self.assertFalse(caller_transport.disconnecting)
        self.assertEqual(self.relayer.summary(), {"active": 1, "total": 1, "bytes": 27})  # counted while open
        self.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(caller_transport.aborted and target_transport.aborted)
        self.assertEqual(self.relayer.summary(), {"active": 0, "total": 1, "bytes": 27})
        self.assertFalse(self.clock.getDelayedCalls())

    def test_ended_link_leaves_no_timer(self):
        end, _, target_transport = self.splice()
        end.connectionLost(None)
        self.assertTrue(target_transport.disconnecting)  # the target's end is closed too
        end.other.connectionLost(None)
        self.assertEqual(self.relayer.active, 0)
        self.assertFalse(self.clock.getDelayedCalls())


class _Cluster:
    """What the stream responder asks of a cluster about relaying."""

    name = "company"

    def __init__(self, relayer, members):
        self._relayer, self._members = relayer, frozenset(members)
        self.target = _TargetLink()

    def members(self):
        return self._members

    def manager_id52(self):
        return "manager"

    def relay_open(self, caller, target):
        return self._relayer.open(self.target, caller, target)


class RelayResponders(SynchronousTestCase):
    def setUp(self):
        self.relayer = Relayer(Clock())
        self.cluster = _Cluster(self.relayer, {"member", "target"})
        self.responder = StreamResponder(self.cluster)

    def ask(self, peer, kind="relay", target="target"):
        return defer.maybeDeferred(self.responder, StreamRequest(PeerAddress("relay", peer), kind, target))

    def test_only_members_and_the_manager_may_open(self):
        for outsider in ("named-in-allow-from", "config-editor"):
            e = self.failureResultOf(self.ask(outsider), StreamRefused).value
            self.assertEqual(e.code, "RELAY_REFUSED")
            self.assertIn("only members", e.reason)
        self.assertEqual(self.cluster.target.opened, [])  # nothing reached the target
        self.ask("member")
        self.ask("manager")
        self.assertEqual([(kind, caller) for kind, caller, _, _ in self.cluster.target.opened],
                         [("relayed", "member"), ("relayed", "manager")])

    def test_one_link_carries_many_relayed_links_up_to_the_quota(self):
        """A link carries many streams: the caller's quota, not its links, bounds what it relays."""
        relayer = Relayer(Clock(), per_caller=3, pending_per_caller=3)
        self.cluster._relayer = relayer
        asked = [self.ask("member") for _ in range(4)]
        self.assertIn("wait for their target", self.failureResultOf(asked[3], StreamRefused).value.reason)
        self.assertEqual(len(self.cluster.target.opened), 3)


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
    """A relayed link that never starts its TLS handshake."""

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


@defer.inlineCallbacks
def dial(testcase, who: Identity, peer: str, addr: str, advertise=()):
    """A ready link from ``who`` (this process) to a daemon, closed after the test."""
    dialer = Dialer(reactor, PeerTLS([who]), AddressBook())
    link = yield dial_ready(dialer, who, peer, link_factory(PeerAMPFactory(HelloInfo(addrs=tuple(advertise)),
                                                                        dialer=True)), [addr])

    def close():
        link.close("the test is over")
        return link.closed

    testcase.addCleanup(close)
    return link


@defer.inlineCallbacks
def _open(link, kind: str, target: str):
    """A ``kind`` stream to ``target`` that never starts TLS: its ``_Silent`` end, or the refusal."""
    silent = _Silent()
    try:
        yield link.open(kind, target, silent)
    except StreamRefused as e:
        return e
    return silent


class RelayAbuseEndToEnd(TestCase):
    timeout = 90

    def setUp(self):
        self.d = daemons()
        wait_for(lambda: status(self.d.cm)["relay_active"] == 0 and status(self.d.relay)["relay_active"] == 0,
                 20, "the relays to carry nothing")

    @defer.inlineCallbacks
    def relay_open(self, who: Identity, relay: str, addr: str, target=None):
        """A ``relay`` stream to web01 (or ``target``) on a new link to ``relay``."""
        link = yield dial(self, who, relay, addr)
        return (yield _open(link, "relay", target or self.d.ids["web01"]))

    def assertRefused(self, result, words: str):
        self.assertIsInstance(result, StreamRefused)
        self.assertEqual(result.code, "RELAY_REFUSED")
        self.assertIn(words, result.reason)

    @defer.inlineCallbacks
    def test_only_members_may_use_a_relay(self):
        d = self.d
        refused = yield self.relay_open(d.editor, d.cm_id52, d.cm_addr)  # a config editor who is no machine
        self.assertRefused(refused, "only members")
        refused = yield self.relay_open(d.alice, d.ids["relay01"], d.relay_addr)  # named in an allow_from
        self.assertRefused(refused, "only members")
        opened = yield self.relay_open(d.laptop, d.ids["relay01"], d.relay_addr)  # a member may
        self.assertIsInstance(opened, _Silent)

    @defer.inlineCallbacks
    def test_only_relays_may_open_relayed_streams(self):
        d = self.d
        link = yield dial(self, d.laptop, d.ids["web01"], d.web.peer_addr())  # web01 lets laptop in…
        refused = yield _open(link, "relayed", d.laptop.id52)  # …but not pose as a relay
        self.assertRefused(refused, "only this cluster's manager or a member with relay = true")
        self.assertEqual([stream.request.kind for stream in link.streams.values()], ["control"])
        self.assertTrue(link.accepting)  # a refused stream, not a lost link

    @defer.inlineCallbacks
    def test_a_relay_relays_only_to_other_members(self):
        d = self.d
        link = yield dial(self, d.laptop, d.ids["relay01"], d.relay_addr)
        self.assertRefused((yield _open(link, "relay", d.alice.id52)), "is not a member of company")
        self.assertIsInstance((yield _open(link, "relay", d.ids["relay01"])), StreamRefused)  # itself
        self.assertIsInstance((yield _open(link, "relay", d.ids["web01"])), _Silent)  # the same link, another may

    @defer.inlineCallbacks
    def test_quota_per_caller_and_handshake_deadline(self):
        d = self.d
        results = []
        for _ in range(MAX_PER_CALLER + 8):  # a link each: the quota is the caller's, not a link's
            results.append((yield self.relay_open(d.laptop, d.cm_id52, d.cm_addr)))
        opened = [r for r in results if isinstance(r, _Silent)]
        refused = [r for r in results if isinstance(r, StreamRefused)]
        self.assertEqual((len(opened), len(refused)), (MAX_PER_CALLER, 8), [str(r) for r in refused[:2]])
        self.assertRefused(refused[0], f"you have {MAX_PER_CALLER} relayed links")
        yield _until(lambda: all(s.lost.called for s in opened), HANDSHAKE_TIMEOUT + 5,
                     "the relay to cut links that never started TLS")
        self.assertFalse(any(s.got for s in opened))
        wait_for(lambda: status(d.cm)["relay_active"] == 0, 5, "the relay's slots to be free")

    @defer.inlineCallbacks
    def test_relayed_links_beyond_the_quota_on_one_link_are_refused(self):
        """One link carries many streams, so many relayed links: the caller's quotas bound them."""
        d = self.d
        link = yield dial(self, d.laptop, d.cm_id52, d.cm_addr)
        target = d.ids["web01"]
        burst = yield defer.gatherResults([_open(link, "relay", target)
                                           for _ in range(MAX_PENDING_PER_CALLER + 4)])  # in one read
        waiting = [r for r in burst if isinstance(r, StreamRefused)]
        self.assertEqual(len(waiting), 4)
        self.assertRefused(waiting[0], f"{MAX_PENDING_PER_CALLER} of your relayed links wait for their target")
        results = [r for r in burst if isinstance(r, _Silent)]
        while len(results) < MAX_PER_CALLER + 8:
            results.append((yield _open(link, "relay", target)))
        opened = [r for r in results if isinstance(r, _Silent)]
        refused = [r for r in results if isinstance(r, StreamRefused)]
        self.assertEqual((len(opened), len(refused)), (MAX_PER_CALLER, 8))
        for r in refused:
            self.assertRefused(r, f"you have {MAX_PER_CALLER} relayed links, the most this relay carries")
        self.assertTrue(link.accepting)  # refused streams, the link stays
        self.assertEqual(status(d.cm)["relay_active"], MAX_PER_CALLER)
        yield _until(lambda: all(s.lost.called for s in opened), HANDSHAKE_TIMEOUT + 5,
                     "the relay to cut links that never started TLS")
        self.assertNotIn("Traceback", d.web_log())


class HelloAddressesEndToEnd(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_foreign_addresses_are_not_stored_or_dialed(self):
        d = daemons()
        closed = [free_port() for _ in range(MAX_LEARNT + 2)]
        advertise = ["169.254.169.254:80", "192.0.2.77:7420"] + [f"127.0.0.1:{p}" for p in closed]
        link = yield dial(self, d.laptop, d.cm_id52, d.cm_addr, advertise)
        state = d.cm.root / "clusters" / "company" / "state.json"

        def stored():
            return json.loads(state.read_text())["machines"].get("laptop", {}).get("addrs")

        yield _until(stored, 10, "the manager to note where laptop listens")
        self.assertEqual(stored(), [f"tcp:127.0.0.1:{p}" for p in closed[:MAX_LEARNT]])
        link.close("done")
        yield link.closed
        wait_for(lambda: "laptop" not in {p["peer"] for p in status(d.cm)["clusters"][0]["peer_links"]}, 10,
                 "the manager to drop the link")
        r = d.cm.malai("ping", "laptop.company")
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn(f"127.0.0.1:{closed[0]}", r.stderr)  # it dialed where laptop's link came from…
        self.assertNotIn("169.254.169.254", r.stderr)  # …and nowhere else
        self.assertNotIn("192.0.2.77", r.stderr)
