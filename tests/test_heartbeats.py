"""Heartbeats and inventory with real daemons on loopback: a manager, web01 and web02 (which may
reach web01), heartbeats every second; laptop (a member with no rights) and a stranger are
played in-process with their keys."""

import json
import os
import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

import malai
from malai.identity import Identity
from malai.p2p.dial import AddressBook, Dialer
from malai.p2p.tls import PeerTLS
from malai.peer.commands import Heartbeat, ListMachines, NotAllowed
from malai.peer.links import LinkPool, link_factory
from malai.peer.protocol import HelloInfo, PeerAMPFactory
from tests.helpers import KEYS, DaemonHome, wait_for

INTERVAL = 1


class HeartbeatCluster:
    def __init__(self, testcase):
        self.cm, self.web01, self.web02 = (DaemonHome(testcase) for _ in range(3))
        out = self.cm.ok("cluster", "init", "company")
        self.cm_id52 = out.split("manager ID52: ")[1].split()[0]
        self.config = self.cm.root / "clusters" / "company" / "cluster.toml"
        self.config.write_text(self.config.read_text().replace(
            'cluster_name = "company"\n', f'cluster_name = "company"\nheartbeat = {INTERVAL}\n'))
        self.cm.start()
        self.ids = {}
        for name, home in (("web01", self.web01), ("web02", self.web02)):
            out = home.ok("machine", "init", self.cm_id52, "company", "--addr", self.cm.peer_addr(), "--name", name)
            self.ids[name] = out.split("machine ID52: ")[1].split()[0]
        with open(self.config, "a") as f:
            f.write(f'\n[machine.web01]\nid52 = "{self.ids["web01"]}"\nallow_from = "web02"\n'
                    f'\n[machine.web02]\nid52 = "{self.ids["web02"]}"\n'
                    f'\n[machine.laptop]\nid52 = "{KEYS["laptop"].id52}"\n')
        self.cm.ok("rescan")
        self.web01.start()
        self.web02.start()
        for name in ("web01", "web02"):
            wait_for(lambda n=name: self.machine(self.cm, n).get("online"), 30, f"{name} online on the manager")

    def machines(self, home) -> dict:
        return {m["name"]: m for m in json.loads(home.ok("machines", "company", "--json"))}

    def machine(self, home, name) -> dict:
        return self.machines(home).get(name, {})

    def key(self, home) -> Identity:
        return Identity.load(home.root / "clusters" / "company" / "machine.private-key")


def _meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024


def _vmrss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


class InventoryTests(TestCase):
    def test_inventory_is_what_proc_says(self):
        c = HeartbeatCluster(self)
        r = c.machine(c.cm, "web01")
        inv = r["inventory"]
        self.assertEqual((r["id52"], r["online"], r["version"], r["sync"]),
                         (c.ids["web01"], True, malai.__version__, "in sync"))
        self.assertLess(time.time() - r["last_seen"], 3 * INTERVAL)
        self.assertEqual(inv["cpus"], os.cpu_count())
        self.assertEqual(inv["memory_total"], _meminfo_total())
        fs = os.statvfs(c.web01.root)
        self.assertEqual(inv["disk_total"], fs.f_blocks * fs.f_frsize)
        self.assertEqual((inv["kernel"], inv["hostname"]), (os.uname().release, os.uname().nodename))
        self.assertEqual(len(inv["load"]), 3)
        with open("/proc/uptime") as f:
            self.assertLess(abs(inv["uptime"] - float(f.read().split()[0])), 3 * INTERVAL + 2)
        rss = _vmrss(c.web01.pid())
        self.assertTrue(rss / 2 < inv["rss"] < rss * 2, (inv["rss"], rss))
        self.assertLess(abs(inv["fds"] - len(os.listdir(f"/proc/{c.web01.pid()}/fd"))), 5)
        self.assertIn(f"tcp:{c.web01.peer_addr()}", inv["paths"])
        self.assertIn(f"relay:{c.cm_id52}", inv["paths"])
        self.assertEqual(r["link"], f"tcp:{c.cm.peer_addr()}")
        self.assertGreater(r["rtt"], 0)
        # one machine in full, on the manager and on a member that may reach it
        for home in (c.cm, c.web02):
            out = home.ok("machines", "company", "web01")
            self.assertIn(f"web01 {c.ids['web01']}", out)
            self.assertIn(f"cpus      {os.cpu_count()},", out)
        # a member lists only what it may reach; an unknown machine is a usage error naming it
        self.assertEqual(set(c.machines(c.web02)), {"web01"})
        self.assertEqual(c.machines(c.web01), {})
        r = c.web02.malai("machines", "company", "web02")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("no machine 'web02' that this device may reach", r.stderr)
        # the manager's status counts the heartbeat as last seen
        [sync] = [m for m in c.cm.status()["clusters"][0]["sync"] if m["machine"] == "web01"]
        self.assertLess(time.time() - sync["last_seen"], 3 * INTERVAL)


class OnlineTests(TestCase):
    def test_a_stopped_machine_goes_offline_within_three_intervals_and_comes_back(self):
        c = HeartbeatCluster(self)
        port = c.web01.peer_addr().rsplit(":", 1)[1]
        c.web01.ok("stop")
        stopped = time.monotonic()
        wait_for(lambda: not c.machine(c.cm, "web01")["online"], 3 * INTERVAL + 5, "web01 offline on the manager")
        offline_after = time.monotonic() - stopped
        self.assertLessEqual(offline_after, 3 * INTERVAL + 1.5)  # + the time one `malai machines` takes
        wait_for(lambda: not c.machine(c.web02, "web01")["online"], 5, "web01 offline on web02")
        self.assertTrue(c.machine(c.cm, "web02")["online"])
        out = c.cm.ok("machines", "company")
        self.assertRegex(out, r"web01 +offline +seen 0m0\ds ago")
        c.web01.start(f"tcp:{port}:interface=127.0.0.1")
        wait_for(lambda: c.machine(c.cm, "web01")["online"], 3 * INTERVAL + 5, "web01 online again")
        wait_for(lambda: c.machine(c.web02, "web01")["online"], 5, "web01 online again on web02")

    def test_the_manager_remembers_last_seen_across_a_restart(self):
        c = HeartbeatCluster(self)
        c.web01.ok("stop")
        wait_for(lambda: not c.machine(c.cm, "web01")["online"], 3 * INTERVAL + 5, "web01 offline")
        seen = c.machine(c.cm, "web01")["last_seen"]
        port = c.cm.peer_addr().rsplit(":", 1)[1]
        c.cm.ok("stop")
        self.assertIn(c.ids["web01"], (c.cm.root / "clusters" / "company" / "machines.json").read_text())
        c.cm.start(f"tcp:{port}:interface=127.0.0.1")
        r = c.machine(c.cm, "web01")
        self.assertEqual((r["online"], r["last_seen"], r["inventory"]["cpus"]), (False, seen, os.cpu_count()))


class TrustTests(TestCase):
    """Heartbeats and listings from members with no rights, forged and oversized ones, and a stranger."""

    def setUp(self):
        self.c = HeartbeatCluster(self)

    @defer.inlineCallbacks
    def call_as(self, identity, command, **kwargs):
        pool = LinkPool(Dialer(reactor, PeerTLS([identity]), AddressBook()), link_factory(PeerAMPFactory(HelloInfo(), True)))
        try:
            link = yield pool.get(identity, self.c.cm_id52, [self.c.cm.peer_addr()])
            return (yield link.callRemote(command, **kwargs))
        finally:
            yield pool.close()

    def beat(self, **changes):
        fields = {"version": "9.9", "os": "forged", "kernel": "k", "hostname": "laptop-host", "cpus": 64,
                  "load": [0.0, 0.0, 0.0], "memory_total": 1, "memory_used": 1, "disk_total": 1, "disk_used": 1,
                  "uptime": 1.0, "rss": 1, "fds": 1, "paths": [], "config_version": 1, "link": "tcp:x", "rtt": 0.1}
        return {**fields, **changes}

    @defer.inlineCallbacks
    def test_a_member_reports_only_about_itself_within_bounds(self):
        laptop = KEYS["laptop"]
        yield self.call_as(laptop, Heartbeat, **self.beat())
        machines = self.c.machines(self.c.cm)
        self.assertEqual(machines["laptop"]["inventory"]["hostname"], "laptop-host")
        self.assertNotEqual(machines["web01"]["inventory"]["hostname"], "laptop-host")
        for changes, why in (({"hostname": "x" * 10_000}, "hostname is longer than 256 characters"),
                             ({"paths": ["tcp:a:1"] * 17}, "paths has 17 items"),
                             ({"memory_total": -1}, "memory_total is out of range"),
                             ({"uptime": float("inf")}, "uptime is out of range"),
                             ({"load": [float("nan")]}, "load is out of range")):
            e = yield self.assertFailure(self.call_as(laptop, Heartbeat, **self.beat(**changes)), NotAllowed)
            self.assertIn(why, str(e))
        self.assertEqual(self.c.machine(self.c.cm, "laptop")["inventory"]["hostname"], "laptop-host")

    @defer.inlineCallbacks
    def test_listings_hold_only_what_the_caller_may_reach(self):
        answer = yield self.call_as(KEYS["laptop"], ListMachines)
        self.assertEqual(answer["machines"], [])
        answer = yield self.call_as(self.c.key(self.c.web02), ListMachines)
        self.assertEqual([m["name"] for m in answer["machines"]], ["web01"])
        answer = yield self.call_as(self.c.key(self.c.web02), ListMachines, machine="laptop")
        self.assertEqual(answer["machines"], [])

    @defer.inlineCallbacks
    def test_a_stranger_gets_no_link(self):
        stranger = KEYS["mallory"]
        yield self.assertFailure(self.call_as(stranger, Heartbeat, **self.beat()), Exception)
        self.assertNotIn(stranger.id52, json.dumps(self.c.machines(self.c.cm)))
