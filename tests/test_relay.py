"""Relaying: a machine nobody can dial is reached through its cluster manager.

The end-to-end test runs real daemons in two network namespaces of its own:
the manager and the laptop in one, web01 in the other, listening only on its
own loopback. Nothing leaves the machine. The in-process test checks that the
relay carries only ciphertext."""

import os
import shutil
import subprocess

from twisted.internet import defer, protocol, reactor, task
from twisted.trial.unittest import TestCase

from malai.identity import Identity
from malai.p2p.dial import AddressBook, Dialer
from malai.p2p.link import connect_verified, server_factory
from malai.p2p.tls import PeerTLS
from malai.peer import splice
from malai.peer.mux import MuxLinkFactory
from malai.peer.relaying import Relayer, relay_endpoint
from malai.peer.streams import StreamRefused
from tests.helpers import MALAI, DaemonHome, wait_for

MARKER = b"plaintext-marker-7f3a9c"


class NetNS:
    """A network namespace of the test's own, with its loopback up."""

    def __init__(self, testcase, name: str):
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        testcase.addCleanup(subprocess.run, ["ip", "netns", "del", name])
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True, capture_output=True,
                              text=True, **kw)

    def start(self, home: DaemonHome, listen: str) -> None:
        """``malai daemon`` for ``home`` inside this namespace."""
        r = subprocess.run(["ip", "netns", "exec", self.name, MALAI, "daemon", "--listen", listen],
                           env=dict(os.environ, MALAI_HOME=str(home.root)), capture_output=True, text=True)
        if r.returncode:
            raise AssertionError(f"daemon in {self.name}: {r.stderr}")


def join_in_namespace(testcase, ns: NetNS, cm_host: str):
    """A manager started in ``ns`` on ``cm_host:7420``; web01 and laptop joined to it (not started).
    (cm, web, laptop, the manager's ID52, {name: ID52})."""
    cm, web, laptop = DaemonHome(testcase), DaemonHome(testcase), DaemonHome(testcase)
    cm_id52 = cm.ok("cluster", "init", "company").split("manager ID52: ")[1].split()[0]
    ns.start(cm, f"tcp:7420:interface={cm_host}")
    ids = {}
    for home, name in ((web, "web01"), (laptop, "laptop")):
        out = home.ok("machine", "init", cm_id52, "company", "--addr", f"{cm_host}:7420", "--name", name)
        ids[name] = out.split("machine ID52: ")[1].split()[0]
    return cm, web, laptop, cm_id52, ids


class RelayEndToEnd(TestCase):
    def setUp(self):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            self.skipTest("needs root and iproute2 for network namespaces")

    def test_machine_without_inbound_path(self):
        tag = str(os.getpid())
        hub, lan = NetNS(self, f"mhub{tag}"), NetNS(self, f"mlan{tag}")
        a, b = f"mva{tag}", f"mvb{tag}"
        subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
        subprocess.run(["ip", "link", "set", a, "netns", hub.name], check=True)
        subprocess.run(["ip", "link", "set", b, "netns", lan.name], check=True)
        hub.run("ip", "addr", "add", "10.201.0.1/24", "dev", a)
        hub.run("ip", "link", "set", a, "up")
        lan.run("ip", "addr", "add", "10.201.0.2/24", "dev", b)
        lan.run("ip", "link", "set", b, "up")

        cm, web, laptop, cm_id52, ids = join_in_namespace(self, hub, "10.201.0.1")
        relay = DaemonHome(self)  # a member with relay = true, besides the manager
        out = relay.ok("machine", "init", cm_id52, "company", "--addr", "10.201.0.1:7420", "--name", "relay01")
        ids["relay01"] = out.split("machine ID52: ")[1].split()[0]
        redis = None
        if shutil.which("redis-server"):
            redis = subprocess.Popen(["ip", "netns", "exec", lan.name, "redis-server", "--port", "6379", "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(web.root)],
                                     stdout=subprocess.DEVNULL)
            self.addCleanup(redis.kill)
        config = cm.root / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + (
            f'\n[machine.web01]\nid52 = "{ids["web01"]}"\nallow_from = "laptop"\n'
            '\n[machine.web01.command.whoami]\ncommand = "hostname -I"\nallow_from = "*"\n'
            '\n[machine.web01.tcp.redis]\nport = 6379\nallow_from = "*"\n'
            f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'
            f'\n[machine.relay01]\nid52 = "{ids["relay01"]}"\naddrs = ["10.201.0.1:7422"]\nrelay = true\n'))
        cm.ok("rescan")
        hub.start(relay, "tcp:7422:interface=10.201.0.1")
        lan.start(web, "tcp:7420:interface=127.0.0.1")  # reachable from nowhere but its own namespace
        hub.start(laptop, "tcp:7421:interface=127.0.0.1")

        def in_sync():
            sync = cm.status()["clusters"][0]["sync"]
            return len(sync) == 3 and all(m["sync"] == "in sync" for m in sync)

        wait_for(in_sync, 30, "the machines to take their config")
        wait_for(lambda: relay.status()["clusters"][0]["links"] >= 1, 30, "web01 to keep a link to relay01")
        r = laptop.malai("web01.company", "sh", "-c", f"echo {MARKER.decode()}; hostname -I; exit 7")
        self.assertEqual(r.returncode, 7, r.stderr)
        self.assertEqual(r.stdout.split(), [MARKER.decode(), "10.201.0.2"])
        out = laptop.ok("ping", "web01.company")
        self.assertIn(f"via relay:{ids['relay01']} (relayed)", out)  # the member relay comes before the manager
        out = laptop.ok("ping", "web01.company", "--addr", f"relay:{cm_id52}")
        self.assertIn(f"via relay:{cm_id52}", out)
        if redis is not None:  # a forwarded service: a stream of the same relayed link
            before = relay.status()["relay_bytes"]
            laptop.ok("service", "add", "tcp", "redis", "127.0.0.1:6390", "redis.web01.company")
            self.assertEqual(hub.run("redis-cli", "-p", "6390", "SET", "k", MARKER.decode()).stdout.strip(), "OK")
            self.assertEqual(hub.run("redis-cli", "-p", "6390", "GET", "k").stdout.strip(), MARKER.decode())
            self.assertGreater(relay.status()["relay_bytes"], before)  # it went through relay01
        member, manager = relay.status(), cm.status()
        self.assertEqual(member["relay_total"], 1)  # one relayed link carried every stream laptop → web01
        self.assertGreater(member["relay_bytes"], 0)
        self.assertGreaterEqual(manager["relay_total"], 1)
        paths = {link["peer"]: link["path"] for link in laptop.status()["clusters"][0]["peer_links"]}
        self.assertEqual(paths["web01"], f"relay:{ids['relay01']}")
        # the manager, which web01 dials and nobody can reach web01 from, runs a command and forwards to it
        # over the link web01 keeps: streams opened by the side that accepted the link
        r = cm.malai("web01.company", "whoami")
        self.assertEqual((r.returncode, r.stdout.split()), (0, ["10.201.0.2"]), r.stderr)
        if redis is not None:
            cm.ok("service", "add", "tcp", "redis", "127.0.0.1:6391", "redis.web01.company")
            self.assertEqual(hub.run("redis-cli", "-p", "6391", "GET", "k").stdout.strip(), MARKER.decode())
        paths = {link["peer"]: link["path"] for link in cm.status()["clusters"][0]["peer_links"]}
        self.assertEqual(paths["web01"], "inbound")


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Collect(protocol.Protocol):
    def __init__(self):
        self.got = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.got += data
        if len(self.got) >= len(MARKER) * 100 and not self.done.called:
            self.done.callback(self.got)


class RelayCarriesCiphertext(TestCase):
    """Caller, relay and target in this process, over real TLS on loopback, each link a ``MuxLink``."""

    @defer.inlineCallbacks
    def test_relay_never_holds_the_plaintext(self):
        caller, relay, target = (Identity.generate() for _ in range(3))
        relayer = Relayer(reactor)
        carried = []
        original = splice.Splice.dataReceived

        def recording(self, data):
            carried.append(data)
            return original(self, data)

        self.patch(splice.Splice, "dataReceived", recording)

        # the relay: answers a member's ``relay`` stream by splicing it onto a ``relayed``
        # stream on the link its target keeps here
        at_relay = {}  # peer ID52 → the relay's side of its link

        def relay_streams(request):
            if request.kind != "relay":
                raise StreamRefused("relay streams only", "BAD_REQUEST")
            return relayer.open(at_relay[request.target], request.peer.peer, request.target)

        relay_links = MuxLinkFactory(False, relay_streams)

        def route(addr):
            link = at_relay[addr.peer] = relay_links.buildProtocol(addr)
            return link

        port = reactor.listenTCP(0, server_factory(PeerTLS([relay]), route), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        relay_hint = f"tcp:127.0.0.1:{port.getHost().port}"

        # the target: keeps a link to the relay; a ``relayed`` stream carries a caller's TLS link,
        # accepted like any link, whose streams echo
        target_tls = PeerTLS([target])
        echo_links = MuxLinkFactory(False, lambda request: _Echo())
        accept = server_factory(target_tls, echo_links.buildProtocol)

        def target_streams(request):
            if request.kind != "relayed" or request.peer.peer != relay.id52:
                raise StreamRefused("relayed streams from the relay only", "RELAY_REFUSED")
            return accept.buildProtocol(None)

        target_book = AddressBook()
        target_book.configure(relay.id52, [relay_hint])
        kept = yield Dialer(reactor, target_tls, target_book).connect(target, relay.id52,
                                                                      MuxLinkFactory(True, target_streams))

        # the caller: dials the relay, then the target through a ``relay:`` hint
        caller_tls, caller_book = PeerTLS([caller]), AddressBook()
        caller_book.configure(relay.id52, [relay_hint])
        caller_dialer = Dialer(reactor, caller_tls, caller_book)
        to_relay = yield caller_dialer.connect(caller, relay.id52, MuxLinkFactory(True))
        caller_dialer.kinds["relay"] = relay_endpoint(lambda local, peer: defer.succeed(to_relay))
        endpoint = caller_dialer.endpoint(caller, target.id52, f"relay:{relay.id52}")
        inner = yield connect_verified(caller_tls, caller, target.id52, endpoint, MuxLinkFactory(True))
        self.assertEqual(inner.peer.peer, target.id52)  # the target's own key, pinned end to end
        collect = _Collect()
        yield inner.open("tcp", "echo", collect)
        collect.transport.write(MARKER * 100)
        echoed = yield collect.done
        self.assertEqual(echoed, MARKER * 100)
        through = b"".join(carried)
        self.assertGreater(len(through), len(MARKER) * 200)  # both directions passed the relay's splice…
        self.assertNotIn(MARKER, through)  # …as ciphertext only
        self.assertEqual((relayer.total, relayer.active), (1, 1))
        inner.close("done")
        yield inner.closed
        for _ in range(100):  # the relayed link's end reaches the relay
            if relayer.active == 0:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(relayer.summary(), {"active": 0, "total": 1, "bytes": len(b"".join(carried))})
        for link in (to_relay, kept):
            link.close("done")
        yield defer.DeferredList([to_relay.closed, kept.closed, *(link.closed for link in at_relay.values())])
