"""Config distribution with three real daemons (manager and two machines) on loopback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from malai.config import parse_machine_config
from malai.config.envelope import Envelope
from malai.identity import Identity
from malai.p2p.dial import AddressBook, Dialer
from malai.p2p.tls import PeerTLS
from malai.peer.commands import ConfigRefused, PushConfig
from malai.peer.links import LinkPool, link_factory
from malai.peer.protocol import HelloInfo, PeerAMPFactory
from tests.helpers import DaemonHome, is_dead, wait_for


class ClusterFixture:
    """cm manages 'company'; web01 and web02 are machines; laptop is an editor (no daemon)."""

    def __init__(self, testcase):
        self.cm, self.web01, self.web02, self.laptop = (DaemonHome(testcase) for _ in range(4))
        out = self.cm.ok("cluster", "init", "company")
        self.cm_id52 = out.split("manager ID52: ")[1].split()[0]
        self.cm.start()
        self.ids = {}
        for name, home in (("web01", self.web01), ("web02", self.web02), ("laptop", self.laptop)):
            out = home.ok("machine", "init", self.cm_id52, "company", "--addr", self.cm.peer_addr(), "--name", name)
            self.ids[name] = out.split("machine ID52: ")[1].split()[0]
        self.config = self.cm.root / "clusters" / "company" / "cluster.toml"
        self.base = self.config.read_text().replace('cluster_name = "company"\n',
                                                    'cluster_name = "company"\nconfig_editors = "laptop"\n')
        self.write("uptime")
        self.web01.start()
        self.web02.start()
        self.cm.ok("rescan")

    def write(self, commands: str = "", extra: str = "") -> None:
        text = self.base + "".join(
            f'\n[machine.{name}]\nid52 = "{self.ids[name]}"\n' + (
                'allow_from = "web02, laptop"\n' if name == "web01" else "")
            for name in ("web01", "web02", "laptop"))
        text += "".join(f'\n[machine.web01.command.c{i}]\ncommand = "{line}"\nallow_from = "laptop"\n'
                        for i, line in enumerate(commands.splitlines()) if line)
        self.config.write_text(text + extra)

    def cm_version(self) -> int:
        return self.cm.status()["clusters"][0]["config_version"]

    def machine_version(self, home: DaemonHome) -> int:
        path = home.root / "clusters" / "company" / "machine.toml"
        return parse_machine_config(path.read_text()).version if path.exists() else 0

    def wait_converged(self, *homes, timeout=30.0):
        """Wait until the manager counts these machines in sync and their files hold that version."""
        homes = homes or (self.web01, self.web02)
        names = {self.web01: "web01", self.web02: "web02"}

        def converged(home) -> bool:
            state = self.sync().get(names[home], {})
            return state.get("sync") == "in sync" and self.machine_version(home) == state.get("version")

        for home in homes:
            try:
                wait_for(lambda h=home: converged(h), timeout)
            except AssertionError:
                logs = "\n".join(f"--- {who} log:\n" + "\n".join(log_tail(h, 20)) for who, h in
                                  (("manager", self.cm), (names[home], home)))
                raise AssertionError(f"{names[home]} not in sync after {timeout:g}s: manager says "
                                     f"{self.sync().get(names[home])}, its file holds version "
                                     f"{self.machine_version(home)}\n{logs}") from None
        return self.cm_version()

    def sync(self) -> dict:
        return {m["machine"]: m for m in self.cm.status()["clusters"][0]["sync"]}


class DistributionTests(TestCase):
    def setUp(self):
        self.c = ClusterFixture(self)

    def test_machines_converge_after_rescan(self):
        first = self.c.wait_converged()
        self.c.write("uptime\nsystemctl restart nginx")
        start = time.monotonic()
        out = self.c.cm.ok("rescan", "company")
        self.assertIn("company: reloaded", out)
        version = self.c.wait_converged()
        self.assertGreater(version, first)
        self.assertLess(time.monotonic() - start, 15)
        self.assertEqual(self.c.machine_version(self.c.web01), version)
        self.assertLess(self.c.machine_version(self.c.web02), version)  # its part did not change
        web01 = parse_machine_config((self.c.web01.root / "clusters" / "company" / "machine.toml").read_text())
        self.assertEqual(web01.machine.commands["c1"].command, "systemctl restart nginx")
        web02 = (self.c.web02.root / "clusters" / "company" / "machine.toml").read_text()
        self.assertNotIn("nginx", web02)  # web02 learns nothing of web01's commands
        sync = self.c.sync()
        self.assertEqual((sync["web01"]["sync"], sync["web02"]["sync"]), ("in sync", "in sync"))
        self.assertEqual(sync["laptop"]["sync"], "error")  # it runs no daemon, nothing to push to
        self.assertIn("no known address", sync["laptop"]["error"])
        self.assertEqual(self.c.web01.status()["clusters"][0]["config_version"], version)
        history = sorted(p.name for p in (self.c.cm.root / "clusters" / "company" / "history").iterdir())
        self.assertIn(f"{version}.toml", history)

    def test_machine_that_was_down_converges_when_back(self):
        self.c.wait_converged()
        addr = self.c.web02.peer_addr()
        self.c.web02.ok("stop")
        self.c.write("id", extra='\n[machine.web02.command.x]\ncommand = "id"\n')
        self.c.cm.ok("rescan")
        version = self.c.wait_converged(self.c.web01)
        self.assertLess(self.c.machine_version(self.c.web02), version)
        wait_for(lambda: self.c.sync()["web02"]["sync"] in ("pending", "error"), what="web02 pending")
        self.c.web02.start(f"tcp:{addr.rsplit(':', 1)[1]}:interface=127.0.0.1")
        self.c.wait_converged(self.c.web02)
        wait_for(lambda: self.c.sync()["web02"]["sync"] == "in sync", what="web02 in sync")

    def test_kill_9_during_push_leaves_a_complete_file(self):
        self.c.wait_converged()
        path = self.c.web01.root / "clusters" / "company" / "machine.toml"
        addr = self.c.web01.peer_addr()
        for round_ in range(3):
            # a large config (about 300 KB) so the write takes a while
            self.c.write("\n".join(f"echo {round_} {i} " + "x" * 80 for i in range(3000)))
            self.c.cm.ok("rescan")
            time.sleep(0.05 * round_)
            pid = self.c.web01.pid()
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda p=pid: is_dead(p), what="web01 to die")
            config = parse_machine_config(path.read_text())  # old or new, never half
            self.assertIn(config.version, range(1, self.c.cm_version() + 1))
            self.assertEqual([p.name for p in path.parent.iterdir() if p.name.startswith(".machine")], [])
            self.c.web01.start(f"tcp:{addr.rsplit(':', 1)[1]}:interface=127.0.0.1")
        self.c.wait_converged(self.c.web01)


class RefusalTests(TestCase):
    """Pushes forged in-process, sent to the real web01 daemon."""

    def setUp(self):
        self.c = ClusterFixture(self)
        self.c.wait_converged()
        self.path = self.c.web01.root / "clusters" / "company" / "machine.toml"
        self.before = self.path.read_text()
        self.web01_id52 = self.c.ids["web01"]

    def key(self, home, folder_key):
        return Identity.load(home.root / "clusters" / "company" / folder_key)

    @defer.inlineCallbacks
    def push_as(self, identity, envelope):
        commands = PeerAMPFactory(HelloInfo(), True)
        pool = LinkPool(Dialer(reactor, PeerTLS([identity]), AddressBook()), link_factory(commands))
        try:
            link = yield pool.get(identity, self.web01_id52, [self.c.web01.peer_addr()])
            e = yield self.assertFailure(link.callRemote(
                PushConfig, cluster=envelope.cluster, machine=envelope.machine, version=envelope.version,
                sha256=envelope.sha256, body=envelope.body, signature=envelope.signature), ConfigRefused)
        finally:
            yield pool.close()
        self.assertEqual(self.path.read_text(), self.before)
        return str(e)

    def newer_body(self, version):
        return self.before.replace(f"version = {parse_machine_config(self.before).version}", f"version = {version}")

    @defer.inlineCallbacks
    def test_push_from_another_identity_refused(self):
        web02 = self.key(self.c.web02, "machine.private-key")
        forged = Envelope.seal(web02, self.web01_id52, 100, self.newer_body(100))
        forged = Envelope(self.c.cm_id52, forged.machine, forged.version, forged.sha256, forged.body, forged.signature)
        reason = yield self.push_as(web02, forged)
        self.assertIn(f"accepted only from the cluster manager {self.c.cm_id52}", reason)

    @defer.inlineCallbacks
    def test_bad_signature_and_old_version_refused(self):
        cm = self.key(self.c.cm, "cluster.private-key")
        web02 = self.key(self.c.web02, "machine.private-key")
        good = Envelope.seal(cm, self.web01_id52, 100, self.newer_body(100))
        bad = Envelope(good.cluster, good.machine, good.version, good.sha256, good.body,
                       web02.sign(good.signed_bytes()))
        reason = yield self.push_as(cm, bad)
        self.assertIn("signature does not verify", reason)
        current = parse_machine_config(self.before).version
        old = Envelope.seal(cm, self.web01_id52, current - 1, self.newer_body(current - 1))
        reason = yield self.push_as(cm, old)
        self.assertIn(f"version {current - 1} is not newer than this machine's version {current}", reason)
        other = Envelope.seal(cm, self.c.ids["web02"], 100, self.newer_body(100))
        reason = yield self.push_as(cm, other)
        self.assertIn("envelope is for machine", reason)
        tampered = Envelope(good.cluster, good.machine, good.version, good.sha256, good.body + "\n# x\n",
                            good.signature)
        reason = yield self.push_as(cm, tampered)
        self.assertIn("does not match the envelope's sha256", reason)


class EditingTests(TestCase):
    def setUp(self):
        self.c = ClusterFixture(self)

    def test_download_upload_history_rollback(self):
        laptop = self.c.laptop
        out = laptop.ok("config", "download", "company")
        self.assertTrue(out.startswith("# malai: base sha256 "))
        first = self.c.cm_version()
        path = laptop.root / "c.toml"
        laptop.ok("config", "download", "company", "-o", str(path))
        path.write_text(path.read_text() + '\n[group.ops]\nmembers = "web01"\n')
        out = laptop.ok("config", "upload", "company", str(path))
        self.assertIn(f"version {first + 1}", out)
        self.assertIn("[group.ops]", self.c.config.read_text())
        self.c.wait_converged()
        # the same file again: its base is stale now
        r = laptop.malai("config", "upload", "company", str(path))
        self.assertEqual(r.returncode, 1)
        self.assertIn("changed since you downloaded it", r.stderr)
        self.assertIn("download it again", r.stderr)
        history = json.loads(laptop.ok("config", "history", "company", "--json"))
        self.assertEqual([h["version"] for h in history][-2:], [first, first + 1])
        out = laptop.ok("config", "rollback", "company", str(first))
        self.assertIn(f"now version {first + 2}", out)
        self.assertNotIn("[group.ops]", self.c.config.read_text())
        self.assertEqual(laptop.ok("config", "show", "company", str(first)), laptop.ok("config", "show", "company"))

    def test_non_editor_denied_and_invalid_refused(self):
        r = self.c.web01.malai("config", "download", "company")
        self.assertEqual(r.returncode, 1)
        self.assertIn("config download: denied by cluster_manager.config_editors", r.stderr)
        path = self.c.laptop.root / "c.toml"
        self.c.laptop.ok("config", "download", "company", "-o", str(path))
        path.write_text(path.read_text() + "\nbogus = 1\n")
        r = self.c.laptop.malai("config", "upload", "company", str(path))
        self.assertEqual(r.returncode, 1)
        self.assertIn("bogus: unknown key", r.stderr)
        r = self.c.laptop.malai("config", "upload", "company", str(self.c.config))
        self.assertEqual(r.returncode, 2)
        self.assertIn("no '# malai: base sha256", r.stderr)

    def test_concurrent_uploads_one_wins(self):
        laptop = self.c.laptop
        path = laptop.root / "base.toml"
        laptop.ok("config", "download", "company", "-o", str(path))
        files = []
        for i in range(2):
            f = laptop.root / f"edit{i}.toml"
            f.write_text(path.read_text() + f'\n[group.g{i}]\nmembers = "web01"\n')
            files.append(f)
        malai = str(Path(sys.executable).with_name("malai"))
        env = dict(os.environ, MALAI_HOME=str(laptop.root))
        procs = [subprocess.Popen([malai, "config", "upload", "company", str(f)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in files]
        results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
        codes = sorted(r[2] for r in results)
        self.assertEqual(codes, [0, 1], results)
        loser = next(r for r in results if r[2] == 1)
        self.assertIn("changed since you downloaded it", loser[1])
        text = self.c.config.read_text()
        self.assertEqual(("[group.g0]" in text) + ("[group.g1]" in text), 1)

    def test_edit_with_editor_reopens_on_errors(self):
        laptop = self.c.laptop
        script = laptop.root / "editor.py"
        log = laptop.root / "editor.log"
        script.write_text(
            "import sys\n"
            f"log = open({str(log)!r}, 'a')\n"
            "text = open(sys.argv[1]).read()\n"
            "log.write('CALL\\n' + text[:400] + '\\n')\n"
            "if '# ERROR:' in text:\n"
            "    text = text.replace('bogus = 1\\n', '')\n"
            "else:\n"
            "    text += '\\n[group.edited]\\nmembers = \"web01\"\\nbogus = 1\\n'\n"
            "open(sys.argv[1], 'w').write(text)\n")
        out = laptop.ok("config", "edit", "company", env={"EDITOR": f"{sys.executable} {script}"})
        self.assertIn("uploaded company cluster.toml", out)
        calls = log.read_text().split("CALL\n")[1:]
        self.assertEqual(len(calls), 2)
        self.assertIn("# ERROR:", calls[1])
        self.assertIn("bogus: unknown key", calls[1])
        self.assertIn("[group.edited]", self.c.config.read_text())


def log_tail(home: DaemonHome, lines: int) -> list:
    path = home.root / "log" / "malai.log"
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
