"""LAN discovery (multicast DNS): labels, interface choice, the address book's LAN hints, and a
machine joined with only its manager's ID52 reaching it across a LAN of two network namespaces
the test makes (multicast never leaves them)."""

import os
import shutil
import subprocess

from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.config.device import parse_device
from malai.config.errors import ConfigError
from malai.p2p.dial import AddressBook
from malai.services.discovery import LanDiscovery, lan_interfaces, lan_label, lan_labels
from tests.helpers import DaemonHome, wait_for
from tests.test_relay import NetNS

ID52 = "0" * 51 + "g"
HOST = [("192.0.2.10", 24), ("198.51.100.7", 16)]


class LabelTests(SynchronousTestCase):
    def test_label_hides_the_id52_and_changes_daily(self):
        label = lan_label(ID52, 20000)
        self.assertEqual(len(label), 24)
        self.assertNotIn(ID52[:8], label)
        self.assertEqual(label, lan_label(ID52, 20000))
        self.assertNotEqual(label, lan_label(ID52, 20001))
        self.assertNotEqual(label, lan_label("1" * 51 + "g", 20000))
        self.assertEqual(lan_labels(ID52, 20000 * 86400 + 5), [lan_label(ID52, d) for d in (20000, 19999, 20001)])


class InterfaceTests(SynchronousTestCase):
    def test_loopback_listener_never_multicasts(self):
        self.assertEqual(lan_interfaces(["127.0.0.1:7420", "/tmp/tor.socket"], HOST), ([], 0))

    def test_wildcard_listener_uses_every_lan_interface(self):
        self.assertEqual(lan_interfaces(["0.0.0.0:7420"], HOST), (HOST, 7420))
        self.assertEqual(lan_interfaces([":::7421"], HOST), (HOST, 7421))

    def test_specific_listener_uses_its_interface(self):
        self.assertEqual(lan_interfaces(["127.0.0.1:1", "198.51.100.7:7422"], HOST), ([HOST[1]], 7422))

    def test_config(self):
        self.assertTrue(parse_device("").lan)
        self.assertFalse(parse_device("[discovery]\nlan = false\n").lan)
        error = self.assertRaises(ConfigError, parse_device, "[discovery]\nlan = \"maybe\"\n")
        self.assertIn("malai.toml:2: discovery.lan", str(error))


class _Daemon:
    reactor = None
    clusters: dict = {}

    def addresses(self):
        return ["192.0.2.10:7420"]


class LanHintTests(SynchronousTestCase):
    def test_book_tries_lan_hints_last(self):
        book = AddressBook()
        book.configure(ID52, ["192.0.2.1:1"])
        self.assertEqual(book.hints(ID52), ["tcp:192.0.2.1:1"])
        book.lan = lambda id52: ["tcp:192.0.2.9:7420", "tcp:192.0.2.1:1"]
        self.assertEqual(book.hints(ID52), ["tcp:192.0.2.1:1", "tcp:192.0.2.9:7420"])

    def test_announcements_off_our_networks_are_ignored(self):
        """A LAN device can announce any label: we dial only addresses on our own LAN networks, so an
        announcement cannot make us dial a metadata service or another network."""
        discovery = LanDiscovery(_Daemon(), HOST)
        label = lan_labels(ID52)[0]
        discovery._seen(label, ["169.254.169.254", "10.0.0.1", "192.0.2.77", "192.0.2.78"], 7420)
        self.assertEqual(discovery.hints(ID52), ["tcp:192.0.2.77:7420", "tcp:192.0.2.78:7420"])
        discovery._seen(label, ["10.0.0.1"], 7420)
        self.assertEqual(discovery.hints(ID52), [])

    def test_seen_is_bounded(self):
        from malai.services import discovery as module

        d = LanDiscovery(_Daemon(), HOST)
        for i in range(module.MAX_SEEN + 10):
            d._seen(f"label{i}", ["192.0.2.5"], 1)
        self.assertEqual(len(d.seen), module.MAX_SEEN)
        self.assertNotIn("label0", d.seen)


def two_namespaces(testcase, tag: str, net: str):
    """Two network namespaces joined by a veth pair on ``net``.1 and ``net``.2 (a /24)."""
    a, b = NetNS(testcase, f"mda{tag}"), NetNS(testcase, f"mdb{tag}")
    va, vb = f"mdva{tag}", f"mdvb{tag}"
    subprocess.run(["ip", "link", "add", va, "type", "veth", "peer", "name", vb], check=True)
    subprocess.run(["ip", "link", "set", va, "netns", a.name], check=True)
    subprocess.run(["ip", "link", "set", vb, "netns", b.name], check=True)
    for ns, dev, host in ((a, va, 1), (b, vb, 2)):
        ns.run("ip", "addr", "add", f"{net}.{host}/24", "dev", dev)
        ns.run("ip", "link", "set", dev, "up")
    return a, b


class DiscoveryEndToEnd(TestCase):
    def setUp(self):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            self.skipTest("needs root and iproute2 for network namespaces")

    def test_machine_joined_by_id52_alone_reaches_its_manager(self):
        tag = str(os.getpid())
        hub, lan = two_namespaces(self, tag, "10.203.0")
        cm, web, off = DaemonHome(self), DaemonHome(self), DaemonHome(self)
        cm_id52 = cm.ok("cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        ids = {}
        for home, name in ((web, "web01"), (off, "db01")):
            out = home.ok("machine", "init", cm_id52, "company", "--name", name)  # no --addr: as the tutorial
            ids[name] = out.split("machine ID52: ")[1].split()[0]
        (off.root / "malai.toml").write_text("[discovery]\nlan = false\n")
        config = cm.root / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + f'\n[machine.web01]\nid52 = "{ids["web01"]}"\nallow_from = "*"\n'
                                               f'\n[machine.db01]\nid52 = "{ids["db01"]}"\n')
        hub.start(cm, "tcp:7420:interface=10.203.0.1")
        lan.start(web, "tcp:7420")  # every interface of its namespace
        lan.start(off, "tcp:7421:interface=10.203.0.2")
        self.assertEqual(cm.status()["lan_discovery"], "on")

        def synced(name):
            return any(m["machine"] == name and m["sync"] == "in sync" for m in cm.status()["clusters"][0]["sync"])

        wait_for(lambda: synced("web01"), 30, "web01, given no address, to reach its manager over the LAN")
        links = [(link["peer"], link["path"]) for link in web.status()["clusters"][0]["peer_links"]]
        self.assertIn(("manager", "tcp:10.203.0.1:7420"), links)
        self.assertIn("answer from web01.company", cm.ok("ping", "web01.company"))
        self.assertFalse(synced("db01"))  # LAN discovery off: nothing found it, nothing it found
        self.assertEqual(off.status()["lan_discovery"], "off")
        self.assertIn("LAN discovery is off", off.ok("logs", "-n", "200"))
