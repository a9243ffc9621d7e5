"""What the benchmarks share: the installed ``malai``, a cluster of real daemons on
loopback, an sshd of the run's own, and result tables."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

MALAI = str(Path(sys.executable).with_name("malai"))


def malai(home: Path, *args: str) -> str:
    r = subprocess.run([MALAI, *args], env=dict(os.environ, MALAI_HOME=str(home)), capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"malai {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def status(home: Path) -> dict:
    return json.loads(malai(home, "status", "--json"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on 127.0.0.1:{port}")


class Cluster:
    """Cluster ``company``: a manager and members, each a real daemon in ``root/<name>``.

    ``config(ids, ports)`` is appended to ``cluster.toml`` once every member has
    an ID52 and a peer port. Use as a context manager: the daemons stop at exit."""

    def __init__(self, root: Path, names: Sequence[str], config: Callable[[Dict[str, str], Dict[str, int]], str]):
        self.root = root
        self.names = list(names)
        self.config = config
        self.cm = root / "cm"
        self.homes = {name: root / name for name in names}
        self.ids: Dict[str, str] = {}
        self.ports: Dict[str, int] = {}

    def __enter__(self) -> "Cluster":
        cm_id52 = malai(self.cm, "cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        malai(self.cm, "daemon", "--listen", "tcp:0:interface=127.0.0.1")
        cm_addr = status(self.cm)["listen"][0]
        for name, home in self.homes.items():
            out = malai(home, "machine", "init", cm_id52, "company", "--addr", cm_addr, "--name", name)
            self.ids[name], self.ports[name] = out.split("machine ID52: ")[1].split()[0], free_port()
        path = self.cm / "clusters" / "company" / "cluster.toml"
        path.write_text(path.read_text() + self.config(self.ids, self.ports))
        malai(self.cm, "rescan")
        for name, home in self.homes.items():
            malai(home, "daemon", "--listen", f"tcp:{self.ports[name]}:interface=127.0.0.1")
        deadline = time.monotonic() + 30
        while not all(m["sync"] == "in sync" for m in status(self.cm)["clusters"][0]["sync"]):
            if time.monotonic() > deadline:
                sys.exit("the machines did not take their config within 30 s")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        for home in [*self.homes.values(), self.cm]:
            subprocess.run([MALAI, "stop"], env=dict(os.environ, MALAI_HOME=str(home)), capture_output=True)


class Sshd:
    """An sshd of this run's own on a loopback port, with a fresh key: ``argv`` logs in.
    ``argv`` is None when sshd is not installed."""

    def __init__(self, root: Path):
        self.root = root
        self.proc: Optional[subprocess.Popen] = None
        self.argv: Optional[List[str]] = None

    def __enter__(self) -> "Sshd":
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            return self
        Path("/run/sshd").mkdir(exist_ok=True)
        key, host = self.root / "id_ed25519", self.root / "host_ed25519"
        for path in (key, host):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        port = free_port()
        config = self.root / "sshd_config"
        sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                 "/usr/libexec/sftp-server") if os.path.exists(p)), "internal-sftp")
        config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {key}.pub\n"
                          f"Subsystem sftp {sftp}\n"
                          "PasswordAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n"
                          f"PidFile {self.root}/sshd.pid\nStrictModes no\nAllowTcpForwarding yes\n")
        self.proc = subprocess.Popen([sshd, "-D", "-f", str(config)])
        wait_listening(port)
        self.argv = ["ssh", "-q", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
                     "-o", f"UserKnownHostsFile={self.root}/known_hosts", "-o", "BatchMode=yes", "127.0.0.1"]
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def table(title: str, header: Tuple[str, ...], rows: List[Tuple]) -> None:
    """Print a Markdown table under ``title``."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
