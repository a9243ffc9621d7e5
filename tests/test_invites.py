"""Invites: ``malai cluster invite`` on the manager, ``malai machine join <token>`` on a new device.

Unit tests for the token and the invite store; end to end, real daemons in two network namespaces
the test makes: an invited device joins, takes its config and runs a command for a member; a used,
expired, revoked or forged token is refused; a stranger's link may ask JoinCluster and nothing
else, and with no invite pending it gets no link at all."""

import base64
import json
import os
import shutil
import stat
import subprocess
import time

from twisted.internet import defer, reactor
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.config.invites import Invite, InviteRefused, InviteStore, Token, add_machine, parse_duration
from malai.errors import MalaiError
from malai.identity import Identity
from malai.p2p.dial import AddressBook, Dialer
from malai.p2p.tls import PeerTLS
from malai.peer.commands import ConfigHistory, GetConfig, JoinCluster, JoinRefused, ListMachines
from malai.peer.links import dial_ready, link_factory
from malai.peer.protocol import HelloInfo, PeerAMPFactory
from tests.helpers import DaemonHome, short_home, wait_for
from tests.test_discovery import two_namespaces

CM = "0" * 51 + "g"


class TokenTests(SynchronousTestCase):
    def test_round_trip_on_one_line(self):
        token = Token(CM, "company", "web02", "s3cret", ("10.0.0.1:7420",))
        text = token.encode()
        self.assertTrue(text.startswith("malai-join:"))
        self.assertNotIn("\n", text)
        self.assertEqual(Token.decode(f"  {text}\n"), token)

    def test_damaged_tokens_are_refused_with_a_reason(self):
        good = Token(CM, "company", "web02", "s", ()).encode()
        for bad in ("", "hello", good[:-5], "malai-join:" + "A" * 5000,
                    "malai-join:" + base64.urlsafe_b64encode(json.dumps(
                        {"m": CM, "c": "company", "n": "../etc", "s": "x"}).encode()).decode()):
            error = self.assertRaises(MalaiError, Token.decode, bad)
            self.assertTrue(str(error).startswith(("not an invite token", "the invite token is damaged")), error)

    def test_durations(self):
        self.assertEqual(parse_duration("90s"), 90)
        self.assertEqual(parse_duration("1h"), 3600)
        self.assertEqual(parse_duration("2d"), 172800)
        for bad in ("0", "-1h", "soon", "400d"):
            self.assertRaises(MalaiError, parse_duration, bad)


class StoreTests(SynchronousTestCase):
    def setUp(self):
        self.store = InviteStore(short_home(self))

    def test_secret_works_once_and_is_never_stored(self):
        invite, secret = self.store.create("web02", ("ops",), 3600)
        self.assertNotIn(secret, self.store.path.read_text())
        self.assertEqual(stat.S_IMODE(os.stat(self.store.path).st_mode), 0o600)
        self.assertEqual(self.store.redeem(secret), invite)
        error = self.assertRaises(InviteRefused, self.store.redeem, secret)
        self.assertIn("used already", str(error))

    def test_expired_revoked_and_forged_secrets_are_refused(self):
        _, expired = self.store.create("a", (), 60)
        invite, revoked = self.store.create("b", (), 60)
        self.store.revoke(invite.id)
        self.assertIn("expired", str(self.assertRaises(InviteRefused, self.store.redeem, expired,
                                                       time.time() + 61)))
        self.assertRaises(InviteRefused, self.store.redeem, revoked)
        self.assertRaises(InviteRefused, self.store.redeem, "forged")
        self.assertEqual(self.store.pending(), [])

    def test_one_pending_invite_per_name(self):
        self.store.create("web02", (), 60)
        self.assertRaises(MalaiError, self.store.create, "web02", (), 60)

    def test_add_machine_keeps_comments(self):
        text = '# mine\n[cluster_manager]\nid52 = "x"\n\n[group.ops]\nmembers = "laptop"  # ops\n'
        out = add_machine(text, "web02", CM, Invite("ab", "web02", ("ops",), 0, "", 0, "ops"))
        self.assertIn("# mine", out)
        self.assertIn('members = "laptop, web02"  # ops', out)
        self.assertIn(f'[machine.web02]\n# joined with invite ab\nid52 = "{CM}"\nallow_from = "ops"\n', out)
        self.assertRaises(MalaiError, add_machine, out, "web02", CM, Invite("c", "web02", (), 0, ""))
        self.assertRaises(MalaiError, add_machine, text, "x", CM, Invite("c", "x", ("nope",), 0, ""))


def _id52(out: str, label: str) -> str:
    return out.split(f"{label} ID52: ")[1].split()[0]


class InviteEndToEnd(TestCase):
    """A manager and a laptop in one namespace, new devices in another, joined by a veth pair."""

    def setUp(self):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            self.skipTest("needs root and iproute2 for network namespaces")
        tag = str(os.getpid())
        self.hub, self.lan = two_namespaces(self, tag, "10.204.0")
        self.cm, self.laptop = DaemonHome(self), DaemonHome(self)
        self.cm_id52 = _id52(self.cm.ok("cluster", "init", "company"), "manager")
        laptop = _id52(self.laptop.ok("machine", "init", self.cm_id52, "company", "--addr", "10.204.0.1:7420",
                                      "--name", "laptop"), "machine")
        self.config = self.cm.root / "clusters" / "company" / "cluster.toml"
        self.config.write_text(self.config.read_text() + f'\n[group.ops]\nmembers = "laptop"\n'
                                                         f'\n[machine.laptop]\nid52 = "{laptop}"\n')
        self.hub.start(self.cm, "tcp:7420:interface=10.204.0.1")
        self.hub.start(self.laptop, "tcp:7421:interface=10.204.0.1")

    def invite(self, name: str, *extra: str) -> str:
        r = self.cm.malai("cluster", "invite", "company", name, *extra)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(len(r.stdout.splitlines()), 1)  # the token alone on stdout
        self.assertIn("malai machine join", r.stderr)
        return r.stdout.strip()

    def join(self, home: DaemonHome, token: str):
        return subprocess.run(["ip", "netns", "exec", self.lan.name, "malai", "machine", "join", token],
                              env=dict(os.environ, MALAI_HOME=str(home.root)), capture_output=True, text=True)

    def test_invited_device_joins_and_serves_a_member(self):
        token = self.invite("web02", "--group", "ops", "--allow-from", "ops", "--expires", "10m")
        self.assertEqual(Token.decode(token).addrs, ("10.204.0.1:7420",))  # where the daemon listens
        listed = json.loads(self.cm.ok("cluster", "invites", "company", "--json"))
        self.assertEqual([i["name"] for i in listed], ["web02"])
        web = DaemonHome(self)
        self.lan.start(web, "tcp:7420:interface=10.204.0.2")
        r = self.join(web, token)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Joined cluster 'company' as machine 'web02'", r.stdout)
        text = self.config.read_text()
        self.assertIn("# joined with invite", text)
        self.assertIn('members = "laptop, web02"', text)
        self.assertIn("# cluster.toml: the source of truth", text)  # comments kept
        self.assertEqual(json.loads(self.cm.ok("cluster", "invites", "company", "--json")), [])

        def synced():
            return [m["machine"] for m in self.cm.status()["clusters"][0]["sync"] if m["sync"] == "in sync"]

        wait_for(lambda: {"laptop", "web02"} <= set(synced()), 30, "web02 to take its config")
        history = self.cm.ok("config", "history", "company")
        self.assertIn("invite", history)
        r = self.laptop.malai("web02.company", "hostname", "-I")
        self.assertEqual((r.returncode, r.stdout.split()), (0, ["10.204.0.2"]), r.stderr)

        again = DaemonHome(self)  # the same token, used again
        r = self.join(again, token)
        self.assertEqual(r.returncode, 1)
        self.assertIn("closed the link at once: it takes new devices only while an invite is pending", r.stderr)
        self.assertFalse((again.root / "clusters" / "company").exists())  # nothing left: it can be run again

    def test_expired_revoked_and_forged_tokens_are_refused(self):
        expired = self.invite("db01", "--expires", "1s")
        revoked = self.invite("db02")
        listed = json.loads(self.cm.ok("cluster", "invites", "company", "--json"))
        self.cm.ok("cluster", "invites", "company", "--revoke", [i["id"] for i in listed if i["name"] == "db02"][0])
        pending = self.invite("db03")
        forged = Token.decode(pending)
        forged = Token(forged.manager, forged.cluster, "db03", "a-guessed-secret", forged.addrs).encode()
        time.sleep(1.5)
        for token, why in ((expired, "expired"), (revoked, "not valid"), (forged, "not valid")):
            r = self.join(DaemonHome(self), token)
            self.assertEqual(r.returncode, 1, r.stdout)
            self.assertIn(why, r.stderr)
        self.assertNotIn("db0", self.config.read_text())
        self.assertIn("refused a join from", self.cm.ok("logs", "-n", "100"))
        r = self.cm.malai("cluster", "invite", "company", "db09", "--allow-from", "nobody-known")
        self.assertEqual(r.returncode, 1)
        self.assertIn("would not take machine 'db09'", r.stderr)


class StrangerLinkTests(TestCase):
    """What a device the manager does not know may do on its link: JoinCluster only."""

    def setUp(self):
        self.cm = DaemonHome(self)
        self.cm_id52 = _id52(self.cm.ok("cluster", "init", "company"), "manager")
        self.cm.start()
        self.addr = self.cm.peer_addr()
        self.stranger = Identity.generate()
        self.links = []

    def tearDown(self):
        for link in self.links:
            if not link.closed.called:
                link.transport.abortConnection()
        return defer.DeferredList([link.closed for link in self.links])

    @defer.inlineCallbacks
    def dial(self):
        dialer = Dialer(reactor, PeerTLS([self.stranger]), AddressBook(), timeout=5)
        link = yield dial_ready(dialer, self.stranger, self.cm_id52,
                                link_factory(PeerAMPFactory(HelloInfo(), dialer=True)), [self.addr])
        self.links.append(link)
        return link

    @defer.inlineCallbacks
    def test_no_invite_pending_no_link(self):
        try:
            yield self.dial()
        except Exception:
            pass
        else:
            self.fail("a stranger got a link with no invite pending")
        wait_for(lambda: f"closing link from {self.stranger.id52}" in self.cm.ok("logs", "-n", "50"), 5,
                 "the manager to log the refusal")

    @defer.inlineCallbacks
    def test_stranger_may_only_join(self):
        self.cm.ok("cluster", "invite", "company", "web02", "--addr", self.addr)
        link = yield self.dial()
        for command in (GetConfig, ConfigHistory, ListMachines):
            with self.assertRaises(amp.UnhandledCommand):
                yield link.callRemote(command)
        with self.assertRaises(JoinRefused):
            yield link.callRemote(JoinCluster, secret="wrong")
        self.assertNotIn("web02", (self.cm.root / "clusters" / "company" / "cluster.toml").read_text())
