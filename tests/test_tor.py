"""A machine with no TCP listener at all, reached through its onion service.

Everything runs in a network namespace of the test's own: a private Tor
network on 127.0.0.1 (tests/tor_network.py), the manager, web01 (whose only
peer listeners are UNIX sockets) and a laptop, each daemon using one of the
private network's Tor nodes through its control port."""

import os
import shutil

from twisted.trial.unittest import TestCase

from malai.p2p.onion import onion_address
from tests.helpers import short_home, wait_for
from tests.test_relay import NetNS, join_in_namespace
from tests.tor_network import TorNetwork


class OnionTests(TestCase):
    def setUp(self):
        if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tor") is None:
            self.skipTest("needs root, iproute2 and tor")

    def test_machine_reached_through_its_onion_service(self):
        ns = NetNS(self, f"mtor{os.getpid()}")
        net = TorNetwork(short_home(self), ns.name)
        self.addCleanup(net.stop)
        net.start()
        net.wait_bootstrapped()

        cm, web, laptop, _, ids = join_in_namespace(self, ns, "127.0.0.1")
        config = cm.root / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + (
            f'\n[machine.web01]\nid52 = "{ids["web01"]}"\nallow_from = "laptop"\n'
            f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'))
        cm.ok("rescan")
        (web.root / "malai.toml").write_text(f'[tor]\ncontrol = "{net.control("hs")}"\n')
        (laptop.root / "malai.toml").write_text(f'[tor]\ncontrol = "{net.control("client")}"\n')
        ns.start(web, f"unix:{web.root}/peer.socket")  # no TCP listener at all
        ns.start(laptop, "tcp:7421:interface=127.0.0.1")
        self.assertEqual(web.status()["listen"], [f"{web.root}/peer.socket"])

        onion = onion_address(ids["web01"])
        wait_for(lambda: web.status()["onions"] == [onion], 120, "web01's onion service")
        out = laptop.ok("ping", "web01.company", "--addr", f"tor:{onion}:7420", timeout=120)
        self.assertIn(f"via tor:{onion}:7420 (over Tor)", out)
        r = laptop.malai("web01.company", "echo", "through", "tor", timeout=120)
        self.assertEqual((r.stdout, r.returncode), ("through tor\n", 0), r.stderr)
        self.assertEqual(laptop.status()["tor"], "running")
