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


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="malai-demo-"))
    cm, web, laptop = (root / n for n in ("cm", "web01", "laptop"))
    step("A cluster manager creates cluster 'company'")
    out = malai(cm, "cluster", "init", "company")
    cm_id52 = re.search(r"manager ID52: (\S+)", out).group(1)

    step("Two devices join it: a machine (web01) and a client (laptop)")
    ids = {}
    for home, name in ((web, "web01"), (laptop, "laptop")):
        out = malai(home, "machine", "init", cm_id52, "company", "--addr", "127.0.0.1:7420", "--name", name)
        ids[name] = re.search(r"machine ID52: (\S+)", out).group(1)

    step("The admin adds them to cluster.toml: laptop may run commands on web01")
    config = cm / "clusters" / "company" / "cluster.toml"
    with open(config, "a") as f:
        f.write(f'\n[machine.web01]\nid52 = "{ids["web01"]}"\nallow_from = "laptop"\n'
                f'\n[machine.web01.command.uptime]\ncommand = "uptime"\nallow_from = "*"\n'
                f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n')
    print(f"  appended [machine.web01] and [machine.laptop] to {config}")
    malai(cm, "rescan", "--check")

    step("The manager explains who may do what")
    malai(cm, "acl", "check", "company", "--from", "laptop", "--machine", "web01", "--command", "ps", "aux")
    malai(cm, "acl", "check", "company", "--from", "web01", "--machine", "web01", "--command", "ps", check=False)
    malai(cm, "acl", "check", "company", "--from", "web01", "--machine", "web01", "--command", "uptime")

    step("Each device's view")
    for home in (cm, web, laptop):
        malai(home, "info")
    print(f"\ndemo homes left in {root} (remove with: rm -r {root})")


if __name__ == "__main__":
    main()
