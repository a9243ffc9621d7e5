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
