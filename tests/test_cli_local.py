"""The installed ``malai`` command on local setup, in temporary homes."""

import json
import os
import stat
from pathlib import Path

from twisted.trial.unittest import TestCase

from malai.identity import parse_id52
from tests.helpers import KEYS, cluster_text, run_malai


class CliTestCase(TestCase):
    def setUp(self):
        self.home = Path(self.mktemp())

    def malai(self, *args, **kw):
        return run_malai(self.home, *args, **kw)


class KeygenTests(CliTestCase):
    def test_stdout_stderr(self):
        r = self.malai("keygen")
        self.assertEqual(r.returncode, 0)
        secret = r.stdout.strip()
        self.assertEqual(len(secret), 64)
        id52 = r.stderr.split("ID52: ")[1].strip()
        parse_id52(id52)

    def test_file(self):
        os.makedirs(self.home)
        path = self.home / "k"
        r = self.malai("keygen", "--file", str(path))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        r = self.malai("keygen", "--file", str(path))
        self.assertEqual(r.returncode, 1)
        self.assertIn("already exists; not overwriting", r.stderr)


class InitTests(CliTestCase):
    def test_cluster_and_machine(self):
        r = self.malai("cluster", "init", "company")
        self.assertEqual(r.returncode, 0, r.stderr)
        cm = r.stdout.split("manager ID52: ")[1].split()[0]
        folder = self.home / "clusters" / "company"
        self.assertEqual(stat.S_IMODE(os.stat(folder / "cluster.private-key").st_mode), 0o600)
        self.assertIn(f'id52 = "{cm}"', (folder / "cluster.toml").read_text())
        self.assertIn("malai machine init", r.stdout)

        r = self.malai("cluster", "init", "company")
        self.assertEqual(r.returncode, 1)
        self.assertIn("already exists", r.stderr)

        r = self.malai("machine", "init", cm, "work", "--addr", "127.0.0.1:7420", "--name", "web01")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("[machine.web01]", r.stdout)
        machine_id52 = r.stdout.split("machine ID52: ")[1].split()[0]
        self.assertIn(f'id52 = "{machine_id52}"', r.stdout)

        r = self.malai("info", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), [
            {"cluster": "company", "role": "manager", "id52": cm},
            {"cluster": "work", "role": "machine", "id52": machine_id52},
        ])
        r = self.malai("info")
        self.assertIn(cm, r.stdout)

        r = self.malai("rescan", "--check")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("company: ok", r.stdout)

    def test_bad_arguments_exit_2(self):
        for args in (["cluster", "init", "Bad_Name"], ["machine", "init", "nope", "x"],
                     ["machine", "init", KEYS["cm"].id52, "x", "--addr", "noport"],
                     ["cluster"], ["no-such-command"]):
            r = self.malai(*args)
            self.assertEqual(r.returncode, 2, (args, r.stderr))
            self.assertNotIn("Traceback", r.stderr)
            self.assertFalse((self.home / "clusters" / "x").exists())

    def test_help_everywhere(self):
        for args in ([], ["keygen"], ["cluster"], ["cluster", "init"], ["machine"], ["machine", "init"],
                     ["info"], ["rescan"], ["acl"], ["acl", "check"]):
            r = self.malai(*args, "--help")
            self.assertEqual(r.returncode, 0, (args, r.stderr))
            self.assertIn("usage: malai", r.stdout)


    def test_version(self):
        import malai

        r = self.malai("--version")
        self.assertEqual((r.returncode, r.stdout), (0, f"malai {malai.__version__}\n"))


class CheckTests(CliTestCase):
    def setUp(self):
        super().setUp()
        folder = self.home / "clusters" / "company"
        folder.mkdir(parents=True)
        (folder / "cluster.toml").write_text(cluster_text())
        KEYS["cm"].save(folder / "cluster.private-key")
        self.folder = folder

    def test_check_reports_every_error(self):
        (self.folder / "cluster.toml").write_text(cluster_text('bogus = 1\n[machine.x]\nid52 = "short"\n'))
        other = self.home / "clusters" / "other"
        other.mkdir()
        (other / "cluster.toml").write_text(cluster_text())
        KEYS["cm"].save(other / "cluster.private-key")
        os.chmod(other / "cluster.private-key", 0o644)
        r = self.malai("rescan", "--check")
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"{self.folder}/cluster.toml:38: machine.laptop.bogus: unknown key", r.stderr)
        self.assertIn(f"{self.folder}/cluster.toml:40: machine.x.id52: 'short' is not an ID52", r.stderr)
        self.assertIn("chmod 600", r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        r = self.malai("rescan", "--check", "nope")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no cluster 'nope'", r.stderr)

    def test_bad_device_config(self):
        (self.home / "malai.toml").write_text('[aliases]\ninfo = "web01.company ls"\n')
        r = self.malai("rescan", "--check")
        self.assertEqual(r.returncode, 1)
        self.assertIn("malai.toml:2: aliases.info: alias 'info' would shadow", r.stderr)

    def test_acl_check(self):
        r = self.malai("acl", "check", "company", "--from", "laptop", "--machine", "web01", "--command", "restart-nginx")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("allowed by machine.web01.command.restart-nginx.allow_from", r.stdout)
        r = self.malai("acl", "check", "company", "--from", KEYS["alice"].id52, "--machine", "web01",
                       "--command", "restart-nginx")
        self.assertEqual(r.returncode, 1)
        self.assertIn("denied", r.stdout)
        r = self.malai("acl", "check", "company", "--from", "web01", "--service", "mysql")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("machine.db01.tcp.mysql.allow_from", r.stdout)
        r = self.malai("acl", "check", "company", "--from", "laptop", "--machine", "db01", "--shell")
        self.assertEqual(r.returncode, 1)
        r = self.malai("acl", "check", "company", "--from", "ghost", "--machine", "db01")
        self.assertEqual(r.returncode, 2)
        self.assertIn("not a machine of company nor an ID52", r.stderr)
