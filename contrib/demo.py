"""``make demo``: a real cluster on this machine, printing each step.

Creates a cluster manager and machines in temporary MALAI_HOMEs with the
installed ``malai`` command, wires them together in ``cluster.toml`` and
shows what each device knows.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MALAI = shutil.which("malai") or str(Path(sys.executable).with_name("malai"))


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def malai(home: Path, *args: str, check: bool = True) -> str:
    print(f"$ MALAI_HOME={home.name} malai {' '.join(args)}", flush=True)
    r = subprocess.run([MALAI, *args], env=dict(os.environ, MALAI_HOME=str(home)),
                       capture_output=True, text=True)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "))
    if check and r.returncode:
        sys.exit(f"demo failed: malai {' '.join(args)} exited {r.returncode}")
    return r.stdout


def listen_addr(home: Path) -> str:
    import json

    out = subprocess.run([MALAI, "status", "--json"], env=dict(os.environ, MALAI_HOME=str(home)),
                         capture_output=True, text=True).stdout
    return json.loads(out)["listen"][0]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="malai-demo-", dir="/tmp"))
    cm, web, laptop = (root / n for n in ("cm", "web01", "laptop"))
    started = []
    try:
        run(root, cm, web, laptop, started)
    finally:
        if started:
            step("Stopping the daemons")
        for home in started:
            malai(home, "stop", check=False)
    print(f"\ndemo homes left in {root} (remove with: rm -r {root})")


def run(root: Path, cm: Path, web: Path, laptop: Path, started: list) -> None:
    step("A cluster manager creates cluster 'company' and starts its daemon")
    out = malai(cm, "cluster", "init", "company")
    cm_id52 = re.search(r"manager ID52: (\S+)", out).group(1)
    malai(cm, "daemon", "--listen", "tcp:0:interface=127.0.0.1")
    started.append(cm)
    cm_addr = listen_addr(cm)

    step("Two devices join it and start their daemons: a machine (web01) and a client (laptop)")
    ids, addrs = {}, {}
    for home, name in ((web, "web01"), (laptop, "laptop")):
        out = malai(home, "machine", "init", cm_id52, "company", "--addr", cm_addr, "--name", name)
        ids[name] = re.search(r"machine ID52: (\S+)", out).group(1)
        malai(home, "daemon", "--listen", "tcp:0:interface=127.0.0.1")
        started.append(home)
        addrs[name] = listen_addr(home)

    step("The admin adds them to cluster.toml: laptop may run commands on web01")
    config = cm / "clusters" / "company" / "cluster.toml"
    with open(config, "a") as f:
        f.write(f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["{addrs["web01"]}"]\nallow_from = "laptop"\n'
                f'\n[machine.web01.command.uptime]\ncommand = "uptime"\nallow_from = "*"\n'
                f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\naddrs = ["{addrs["laptop"]}"]\n')
    print(f"  appended [machine.web01] and [machine.laptop] to {config}")
    malai(cm, "rescan", "--check")
    malai(cm, "rescan")

    step("The manager explains who may do what")
    malai(cm, "acl", "check", "company", "--from", "laptop", "--machine", "web01", "--command", "ps", "aux")
    malai(cm, "acl", "check", "company", "--from", "web01", "--machine", "web01", "--command", "ps", check=False)
    malai(cm, "acl", "check", "company", "--from", "web01", "--machine", "web01", "--command", "uptime")

    step("Peer links: mutually authenticated TLS 1.3, pinned to each ID52")
    malai(laptop, "ping", "manager.company", "--count", "2")
    malai(cm, "ping", "web01.company")
    malai(cm, "ping", "laptop.company")

    step("Each daemon's view")
    for home in (cm, web, laptop):
        malai(home, "status")


if __name__ == "__main__":
    main()
