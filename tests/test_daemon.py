"""Real daemons started through the installed CLI in temporary homes."""

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.helpers import DaemonHome, is_dead, wait_for


def set_machine(cm: DaemonHome, machine: DaemonHome, cluster: str, name: str) -> None:
    """machine joins cm's cluster; cm lists it with its live address."""
    cm_id = cm.status()["clusters"][[c["cluster"] for c in cm.status()["clusters"]].index(cluster)]["id52"]
    out = machine.ok("machine", "init", cm_id, cluster, "--addr", cm.peer_addr(), "--name", name)
    machine_id = out.split("machine ID52: ")[1].split()[0]
    with open(cm.root / "clusters" / cluster / "cluster.toml", "a") as f:
        f.write(f'\n[machine.{name}]\nid52 = "{machine_id}"\n')


class LifecycleTests(TestCase):
    def test_start_status_second_start_stop(self):
        home = DaemonHome(self)
        home.ok("cluster", "init", "company")
        out = home.start()
        self.assertIn("malai daemon running (pid", out)
        status = home.status()
        self.assertEqual(status["state"], "RUNNING")
        self.assertEqual(status["pid"], home.pid())
        [cluster] = status["clusters"]
        self.assertEqual((cluster["cluster"], cluster["role"], cluster["machines"], cluster["links"]),
                         ("company", "manager", 0, 0))
        self.assertTrue(status["listen"][0].startswith("127.0.0.1:"))
        self.assertEqual(home.malai("status").returncode, 0)
        # socket and lock are private
        sock = home.root / "malai.socket"
        self.assertTrue(stat.S_ISSOCK(os.stat(sock).st_mode))
        self.assertEqual(stat.S_IMODE(os.stat(sock).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(home.root / "malai.lock").st_mode), 0o600)
        # a second daemon refuses
        r = home.malai("daemon", "--listen", "tcp:0:interface=127.0.0.1")
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"already running (pid {status['pid']})", r.stderr)
        # stop
        r = home.malai("stop")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(sock.exists())
        r = home.malai("status")
        self.assertEqual(r.returncode, 3)
        self.assertIn("NOT RUNNING", r.stdout)
        self.assertTrue(is_dead(status["pid"]))

    def test_concurrent_start_exactly_one_runs(self):
        home = DaemonHome(self)
        home.ok("cluster", "init", "company")
        env = dict(os.environ, MALAI_HOME=str(home.root))
        malai = str(Path(sys.executable).with_name("malai"))
        procs = [subprocess.Popen([malai, "daemon", "--listen", "tcp:0:interface=127.0.0.1"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = [(p.wait(30), p.stdout.read(), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        codes = sorted(code for code, _, _ in results)
        self.assertEqual(codes, [0, 1, 1], results)
        for code, _out, err in results:
            if code:
                self.assertIn("already running", err)
        self.assertEqual(home.status()["state"], "RUNNING")

    def test_kill_9_then_restart(self):
        home = DaemonHome(self)
        home.ok("cluster", "init", "company")
        home.start()
        pid = home.pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: is_dead(pid), what="the daemon to die")
        r = home.malai("status", "--json")
        self.assertEqual(r.returncode, 3)
        self.assertIn('"state": "CRASHED"', r.stdout)
        self.assertIn(f"the daemon (pid {pid}) is gone", r.stdout)
        self.assertIn("`malai daemon` clears them", r.stdout)
        home.start()
        self.assertNotEqual(home.pid(), pid)
        self.assertEqual(home.status()["state"], "RUNNING")

    def test_port_in_use_is_a_clear_error(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        home = DaemonHome(self)
        r = home.malai("daemon", "--listen", f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Address already in use", r.stderr)
        self.assertEqual(home.malai("status").returncode, 3)

    def test_twistd_foreground_and_sigterm(self):
        home = DaemonHome(self)
        home.ok("cluster", "init", "company")
        twistd = str(Path(sys.executable).with_name("twistd"))
        proc = subprocess.Popen([twistd, "-n", "--pidfile=", "--logfile=-", "malai", "--home", str(home.root),
                                 "--listen", "tcp:0:interface=127.0.0.1"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(proc.stdout.close)
        wait_for(lambda: (home.root / "malai.socket").exists(), what="the control socket")
        self.assertEqual(home.status()["pid"], proc.pid)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(30), 0)
        log = proc.stdout.read()
        self.assertIn("ready", log)
        self.assertIn("stopping", log)
        self.assertEqual(home.malai("status").returncode, 3)

    def test_foreground_logs_to_stdout(self):
        home = DaemonHome(self)
        home.ok("cluster", "init", "company")
        malai = str(Path(sys.executable).with_name("malai"))
        proc = subprocess.Popen([malai, "daemon", "--foreground", "--listen", "tcp:0:interface=127.0.0.1"],
                                env=dict(os.environ, MALAI_HOME=str(home.root)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(proc.stdout.close)
        wait_for(lambda: home.malai("status").returncode == 0, what="the daemon")
        self.assertEqual(home.status()["pid"], proc.pid)  # exec'd in place: the same process
        self.assertEqual(home.malai("stop").returncode, 0)
        self.assertEqual(proc.wait(30), 0)
        out = proc.stdout.read()
        self.assertIn("company: added", out)
        self.assertIn("ready", out)
        self.assertFalse((home.root / "log" / "malai.log").exists())

    def test_json_logs(self):
        home = DaemonHome(self)
        home.ok("daemon", "--json-logs", "--listen", "tcp:0:interface=127.0.0.1")
        import json

        lines = (home.root / "log" / "malai.log").read_text().splitlines()
        events = [json.loads(line.strip("\x1e")) for line in lines if line.strip("\x1e")]
        self.assertTrue(any("ready" in e.get("log_format", "") for e in events), lines[:5])


class RescanTests(TestCase):
    def setUp(self):
        self.cm = DaemonHome(self)
        self.web = DaemonHome(self)
        for cluster in ("alpha", "beta"):
            self.cm.ok("cluster", "init", cluster)
        self.cm.start()
        self.web.start()
        for cluster in ("alpha", "beta"):
            set_machine(self.cm, self.web, cluster, "web01")
        self.cm.ok("rescan")

    def links(self, home):
        return {c["cluster"]: c["links"] for c in home.status()["clusters"]}

    def test_rescan_one_cluster_leaves_the_others_links(self):
        for cluster in ("alpha", "beta"):
            out = self.web.ok("ping", f"manager.{cluster}")
            self.assertIn("answer from", out)
        self.assertEqual(self.links(self.cm), {"alpha": 1, "beta": 1})
        beta_before = self.web.status()
        config = self.cm.root / "clusters" / "alpha" / "cluster.toml"
        config.write_text(config.read_text() + '\n[group.ops]\nmembers = "web01"\n')
        out = self.cm.ok("rescan", "alpha")
        self.assertIn("alpha: reloaded", out)
        self.assertNotIn("beta", out)
        self.assertEqual(self.links(self.cm)["beta"], 1)
        self.assertEqual(self.links(self.web), {c["cluster"]: c["links"] for c in beta_before["clusters"]})
        out = self.web.ok("ping", "manager.beta")
        self.assertIn("answer from", out)

    def test_broken_cluster_refused_others_keep_running(self):
        config = self.cm.root / "clusters" / "alpha" / "cluster.toml"
        config.write_text(config.read_text() + "\nbogus = 1\n")
        r = self.cm.malai("rescan")
        self.assertEqual(r.returncode, 1)
        self.assertIn("alpha: refused", r.stdout)
        self.assertIn("beta: unchanged", r.stdout)
        self.assertIn(f"{config}:", r.stderr)
        self.assertIn("bogus: unknown key", r.stderr)
        self.assertIn("answer from", self.web.ok("ping", "manager.beta"))
        self.assertIn("answer from", self.web.ok("ping", "manager.alpha"))  # still serving the old config
        # a daemon started with the broken cluster still runs the rest
        port = self.cm.peer_addr().rsplit(":", 1)[1]
        self.cm.ok("stop")
        self.cm.start(f"tcp:{port}:interface=127.0.0.1")
        clusters = {c["cluster"] for c in self.cm.status()["clusters"]}
        self.assertEqual(clusters, {"beta"})
        self.assertIn("answer from", self.web.ok("ping", "manager.beta"))

    def test_init_and_sighup_rescan(self):
        out = self.cm.ok("cluster", "init", "gamma")
        self.assertIn("gamma: added", out)
        self.assertIn("gamma", {c["cluster"] for c in self.cm.status()["clusters"]})
        # a cluster folder added by hand appears on SIGHUP
        os.rename(self.cm.root / "clusters" / "gamma", self.cm.root / "gamma.away")
        self.cm.ok("rescan")
        self.assertNotIn("gamma", {c["cluster"] for c in self.cm.status()["clusters"]})
        os.rename(self.cm.root / "gamma.away", self.cm.root / "clusters" / "delta")
        os.kill(self.cm.pid(), signal.SIGHUP)
        wait_for(lambda: "delta" in {c["cluster"] for c in self.cm.status()["clusters"]}, what="SIGHUP rescan")

    def test_manager_learns_where_a_machine_listens(self):
        # cluster.toml has no addrs for web01; its Hello told the manager where it listens
        import json

        self.assertIn("answer from", self.web.ok("ping", "manager.alpha"))

        def learnt():  # state.json is written at most once a second
            state = json.loads((self.cm.root / "clusters" / "alpha" / "state.json").read_text())
            return state["machines"]["web01"].get("addrs")

        wait_for(lambda: learnt() == [f"tcp:{self.web.peer_addr()}"], 5, "the address in state.json")

    def test_ping_errors(self):
        r = self.web.malai("ping", "nobody.alpha")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no machine 'nobody'", r.stderr)
        r = self.web.malai("ping", "manager.nocluster")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no cluster 'nocluster'", r.stderr)
