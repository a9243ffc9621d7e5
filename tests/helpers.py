"""Shared test fixtures: identities with fixed keys and a sample cluster."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

from malai.identity import Identity

__all__ = ["KEYS", "MALAI", "cluster_text", "identity", "run_malai"]

#: Deterministic identities, by role in the sample cluster.
KEYS: Dict[str, Identity] = {
    name: Identity.from_hex(f"{i:02x}" * 32)
    for i, name in enumerate(["cm", "web01", "db01", "laptop", "alice", "mallory"], start=1)
}

MALAI = str(Path(sys.executable).with_name("malai"))


def identity(name: str) -> Identity:
    return KEYS[name]


def cluster_text(extra: str = "") -> str:
    """A cluster.toml exercising groups, commands and services."""
    k = {n: i.id52 for n, i in KEYS.items()}
    return f'''\
[cluster_manager]
id52 = "{k['cm']}"
cluster_name = "company"
config_editors = "admins"

[group.admins]
members = "{k['alice']}, devops"

[group.devops]
members = "laptop"

[machine.web01]
id52 = "{k['web01']}"
addrs = ["127.0.0.1:7421"]
allow_from = "admins"
username = "deploy"

[machine.web01.command.restart-nginx]
command = "systemctl restart nginx"
allow_from = "devops"
username = "root"

[machine.web01.http.admin]
port = 8080
allow_from = "admins"

[machine.db01]
id52 = "{k['db01']}"
allow_from = "devops"
allow_shell = "{k['alice']}"

[machine.db01.tcp.mysql]
port = 3306
allow_from = "web01, devops"

[machine.laptop]
id52 = "{k['laptop']}"
{extra}'''


def run_malai(home: Path, *args: str, env: Optional[Dict[str, str]] = None, input: Optional[str] = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the installed ``malai`` command with ``MALAI_HOME=home``."""
    full_env = dict(os.environ, MALAI_HOME=str(home), **(env or {}))
    return subprocess.run([MALAI, *args], env=full_env, capture_output=True, text=True,
                          input=input, timeout=timeout)


def short_home(testcase) -> Path:
    """A MALAI_HOME short enough for a UNIX socket path, removed after the test."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="malai-", dir="/tmp"))
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


class DaemonHome:
    """A temporary MALAI_HOME with helpers to drive a real daemon through the CLI."""

    def __init__(self, testcase):
        self.testcase = testcase
        self.root = short_home(testcase)
        testcase.addCleanup(self.kill)

    def malai(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_malai(self.root, *args, **kw)

    def ok(self, *args: str, **kw) -> str:
        r = self.malai(*args, **kw)
        if r.returncode != 0:
            raise AssertionError(f"malai {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def start(self, *listen: str) -> str:
        args = ["daemon"]
        for endpoint in listen or ("tcp:0:interface=127.0.0.1",):
            args += ["--listen", endpoint]
        return self.ok(*args)

    def status(self) -> dict:
        import json

        return json.loads(self.malai("status", "--json").stdout)

    def pid(self) -> Optional[int]:
        try:
            text = (self.root / "malai.lock").read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    def peer_addr(self) -> str:
        return self.status()["listen"][0]

    def kill(self) -> None:
        import signal
        import time

        pid = self.pid()
        if not pid or is_dead(pid):
            return
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if is_dead(pid):
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def is_dead(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=15.0, what="condition"):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class _Cleanups:
    """Collects cleanups like a TestCase does, run at interpreter exit."""

    def __init__(self):
        self.calls = []
        import atexit

        atexit.register(self.run)

    def addCleanup(self, f, *args):
        self.calls.append((f, args))

    def run(self):
        calls, self.calls = self.calls, []
        for f, args in reversed(calls):
            f(*args)


class LoopbackCluster:
    """Cluster ``company`` on loopback: a manager and named members, each a real daemon.

    ``config(ids, ports)`` returns what to append to ``cluster.toml`` once every
    member has its ID52 (``ids``) and peer port (``ports``); ``listen`` gives a
    member another listening endpoint than that port. Built on first use by a
    test class and kept for all its tests (trial has no setUpClass); torn down
    at exit."""

    def __init__(self, names, config, ready_check=None, listen=None):
        self._cleanups = cleanups = _Cleanups()
        self.cm = DaemonHome(cleanups)
        out = self.cm.ok("cluster", "init", "company")
        self.cm_id52 = out.split("manager ID52: ")[1].split()[0]
        self.cm.start()
        self.homes = {name: DaemonHome(cleanups) for name in names}
        self.ids, self.ports = {}, {}
        for name, home in self.homes.items():
            out = home.ok("machine", "init", self.cm_id52, "company", "--addr", self.cm.peer_addr(), "--name", name)
            self.ids[name] = out.split("machine ID52: ")[1].split()[0]
            self.ports[name] = free_port()
        path = self.cm.root / "clusters" / "company" / "cluster.toml"
        path.write_text(path.read_text() + config(self.ids, self.ports))
        self.cm.ok("rescan")
        for name, home in self.homes.items():
            home.start((listen or {}).get(name, f"tcp:{self.ports[name]}:interface=127.0.0.1"))
        self.wait_in_sync()

    def close(self):
        """Stop the daemons and remove their homes now, not at exit."""
        self._cleanups.run()

    def wait_in_sync(self):
        def synced():
            sync = self.cm.status()["clusters"][0]["sync"]
            return len(sync) == len(self.homes) and all(m["sync"] == "in sync" for m in sync)

        wait_for(synced, 30, "every machine to take its config")


def start_http_upstream():
    """``tests/http_upstream.py`` in a child process killed at exit: (its HTTP port, its WebSocket port)."""
    import atexit

    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("http_upstream.py"))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    atexit.register(proc.kill)
    http, websocket = map(int, proc.stdout.readline().split())
    return http, websocket


def add_http_fronts(cluster: "LoopbackCluster", names) -> Dict[str, int]:
    """An HTTP front on a free loopback port for each of ``names``: {name: port}."""
    fronts = {}
    for name in names:
        fronts[name] = free_port()
        cluster.homes[name].ok("service", "add", "http", f"127.0.0.1:{fronts[name]}")
    return fronts
