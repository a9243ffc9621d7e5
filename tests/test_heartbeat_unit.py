"""The manager's side of heartbeats, on a fake clock: bounds, online within three intervals,
machines.json written atomically at most every few seconds and read back after a restart."""

import json
import os
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from malai.peer.heartbeat import problem
from malai.services.heartbeats import MISSED, SAVE_EVERY, MachineHealth

BEAT = {"hostname": "web01", "cpus": 2, "load": [0.5, 0.25, 0.0], "uptime": 10.0, "paths": ["tcp:1.2.3.4:7420"]}


class BoundsTests(SynchronousTestCase):
    def test_what_passes_and_what_does_not(self):
        self.assertIsNone(problem(BEAT))
        self.assertIsNone(problem({"rtt": None, "hostname": "h" * 256}))
        for fields, why in (({"hostname": "h" * 257}, "hostname is longer"),
                            ({"paths": ["x"] * 17}, "paths has 17 items"),
                            ({"paths": ["x" * 300]}, "paths is longer"),
                            ({"cpus": -1}, "cpus is out of range"),
                            ({"rss": 2**63}, "rss is out of range"),
                            ({"uptime": float("nan")}, "uptime is out of range"),
                            ({"load": [1e13]}, "load is out of range")):
            self.assertIn(why, problem(fields))


class HealthTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: [p.unlink() for p in self.dir.iterdir()] and None)
        self.path = self.dir / "machines.json"
        self.health = MachineHealth(self.clock, self.path)
        self.health.startService()

    def record(self, name="web01", id52="a" * 52, interval=10):
        [r] = self.health.records([(name, id52)], interval, {name: {"sync": "in sync", "version": 3}})
        return r

    def test_online_until_three_heartbeats_are_missed(self):
        self.assertEqual((self.record()["online"], self.record()["last_seen"]), (False, 0.0))
        self.health.record("a" * 52, BEAT)
        self.clock.advance(MISSED * 10)
        r = self.record()
        self.assertEqual((r["online"], r["hostname"], r["sync"], r["config_version"]), (True, "web01", "in sync", 3))
        self.clock.advance(0.001)
        self.assertFalse(self.record()["online"])
        self.health.record("a" * 52, BEAT)
        self.assertTrue(self.record()["online"])

    def test_written_at_most_every_few_seconds_and_read_back(self):
        self.health.record("a" * 52, BEAT)
        self.assertFalse(self.path.exists())
        self.clock.advance(SAVE_EVERY)
        self.assertEqual(json.loads(self.path.read_text())["machines"]["a" * 52]["hostname"], "web01")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.health.record("a" * 52, {**BEAT, "hostname": "renamed"})
        self.health.stopService()  # what is not written yet is written on the way out
        again = MachineHealth(self.clock, self.path)
        again.startService()
        self.assertEqual(again.latest["a" * 52]["hostname"], "renamed")
        self.assertEqual(again.last_seen("a" * 52), self.clock.seconds())

    def test_an_unreadable_file_counts_every_machine_unseen(self):
        for text in ("{not json", '{"machines": []}', '{"machines": {"a": 1}}', "[]"):
            self.path.write_text(text)
            again = MachineHealth(self.clock, self.path)
            again.startService()
            self.assertEqual(again.latest, {}, text)

    def test_machines_gone_from_the_cluster_are_forgotten(self):
        self.health.record("a" * 52, BEAT)
        self.health.record("b" * 52, BEAT)
        self.health.forget_all_but(["b" * 52])
        self.assertEqual(set(self.health.latest), {"b" * 52})
