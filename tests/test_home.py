"""MALAI_HOME scanning: roles, problems per cluster, key checks."""

import os

from twisted.trial.unittest import SynchronousTestCase

from malai.config import parse_cluster, personalize, render_machine_config
from malai.errors import MalaiError
from malai.home import Home, default_home
from tests.helpers import KEYS, cluster_text


class HomeTests(SynchronousTestCase):
    def setUp(self):
        self.home = Home(__import__("pathlib").Path(self.mktemp()))
        self.home.ensure()

    def make_manager(self, alias="company"):
        d = self.home.cluster_dir(alias)
        d.mkdir()
        (d / "cluster.toml").write_text(cluster_text())
        KEYS["cm"].save(d / "cluster.private-key")
        return d

    def make_machine(self, alias="work", with_config=True):
        d = self.home.cluster_dir(alias)
        d.mkdir()
        (d / "cluster-info.toml").write_text(
            f'cluster_alias = "{alias}"\ncluster_manager = "{KEYS["cm"].id52}"\naddrs = ["127.0.0.1:7420"]\n')
        if with_config:
            mc = personalize(parse_cluster(cluster_text()), "web01")
            (d / "machine.toml").write_text(render_machine_config(mc))
        KEYS["web01"].save(d / "machine.private-key")
        return d

    def test_roles(self):
        self.make_manager()
        self.make_machine()
        self.make_machine("waiting", with_config=False)
        entries = {e.alias: e for e in self.home.scan()}
        self.assertEqual(entries["company"].role, "manager")
        self.assertEqual(entries["company"].id52, KEYS["cm"].id52)
        self.assertEqual(entries["work"].role, "machine")
        self.assertEqual(entries["work"].machine.machine.name, "web01")
        self.assertEqual(entries["waiting"].role, "machine")
        self.assertIsNone(entries["waiting"].machine)
        self.assertTrue(all(e.ok for e in entries.values()), [e.problems for e in entries.values()])

    def test_both_files_is_an_error_for_that_cluster_only(self):
        self.make_manager()
        d = self.make_machine("broken")
        (d / "cluster.toml").write_text(cluster_text())
        entries = {e.alias: e for e in self.home.scan()}
        self.assertTrue(entries["company"].ok)
        self.assertFalse(entries["broken"].ok)
        self.assertIn("holds both cluster.toml (manager) and machine.toml", entries["broken"].problems[0])

    def test_key_mismatch_and_mode(self):
        d = self.make_manager()
        os.unlink(d / "cluster.private-key")
        KEYS["mallory"].save(d / "cluster.private-key")
        [entry] = self.home.scan()
        self.assertIn(f"cluster.toml:2: cluster_manager.id52: names {KEYS['cm'].id52} but the key", entry.problems[0])
        os.chmod(d / "cluster.private-key", 0o644)
        [entry] = self.home.scan()
        self.assertIn("chmod 600", entry.problems[0])

    def test_bad_config_reported(self):
        d = self.make_manager()
        (d / "cluster.toml").write_text(cluster_text("oops = 1\n"))
        [entry] = self.home.scan()
        self.assertEqual(entry.problems, (f"{d / 'cluster.toml'}:38: machine.laptop.oops: unknown key",))

    def test_scan_unknown_cluster(self):
        self.make_manager()
        e = self.assertRaises(MalaiError, self.home.scan, "nope")
        self.assertIn("no cluster 'nope'", str(e))
        self.assertIn("company", str(e))

    def test_default_home_from_env(self):
        old = os.environ.get("MALAI_HOME")
        self.addCleanup(lambda: os.environ.__setitem__("MALAI_HOME", old) if old else os.environ.pop("MALAI_HOME", None))
        os.environ["MALAI_HOME"] = "/tmp/somewhere"
        self.assertEqual(str(default_home()), "/tmp/somewhere")
        del os.environ["MALAI_HOME"]
        self.assertTrue(str(default_home()).endswith("malai"))
