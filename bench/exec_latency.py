"""Remote command latency: `malai <machine> true` through the daemon and direct, against `ssh host true`.

    python bench/exec_latency.py [--runs 30]

Real daemons on loopback (a manager, a machine, a laptop) and an sshd of this
run's own on a loopback port with a fresh key. Medians and ratios to ssh.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MALAI = str(Path(sys.executable).with_name("malai"))


def malai(home: Path, *args: str) -> str:
    r = subprocess.run([MALAI, *args], env=dict(os.environ, MALAI_HOME=str(home)), capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"malai {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(argv, env, runs):
    times = []
    for i in range(runs + 3):
        start = time.perf_counter()
        r = subprocess.run(argv, env=env, capture_output=True)
        elapsed = time.perf_counter() - start
        if r.returncode:
            sys.exit(f"{' '.join(argv)} failed: {r.stderr.decode()}")
        if i >= 3:
            times.append(elapsed)
    return statistics.median(times) * 1000


def start_sshd(root: Path):
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        return None, None
    Path("/run/sshd").mkdir(exist_ok=True)
    key, host = root / "id_ed25519", root / "host_ed25519"
    for path in (key, host):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {key}.pub\n"
                      "PasswordAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n"
                      f"PidFile {root}/sshd.pid\nStrictModes no\n")
    proc = subprocess.Popen([sshd, "-D", "-f", str(config)])
    time.sleep(0.5)
    argv = ["ssh", "-q", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={root}/known_hosts", "-o", "BatchMode=yes", "127.0.0.1", "true"]
    return proc, argv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="malai-bench-", dir="/tmp"))
    cm, web, laptop = root / "cm", root / "web01", root / "laptop"
    sshd = None
    try:
        cm_id52 = malai(cm, "cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        malai(cm, "daemon", "--listen", "tcp:0:interface=127.0.0.1")
        cm_addr = __import__("json").loads(malai(cm, "status", "--json"))["listen"][0]
        ids, ports = {}, {}
        for home, name in ((web, "web01"), (laptop, "laptop")):
            out = malai(home, "machine", "init", cm_id52, "company", "--addr", cm_addr, "--name", name)
            ids[name], ports[name] = out.split("machine ID52: ")[1].split()[0], free_port()
        config = cm / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + f'\n[machine.web01]\nid52 = "{ids["web01"]}"\n'
                          f'addrs = ["127.0.0.1:{ports["web01"]}"]\nallow_from = "laptop"\n'
                          f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n')
        malai(cm, "rescan")
        for home, name in ((web, "web01"), (laptop, "laptop")):
            malai(home, "daemon", "--listen", f"tcp:{ports[name]}:interface=127.0.0.1")
        env = dict(os.environ, MALAI_HOME=str(laptop))
        for _ in range(100):
            if subprocess.run([MALAI, "web01.company", "true"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        rows = [("malai web01.company true (through the daemon)", timed([MALAI, "web01.company", "true"], env,
                                                                        args.runs))]
        malai(laptop, "stop")
        rows.append(("malai web01.company true (no daemon: dials directly)",
                     timed([MALAI, "web01.company", "true"], env, args.runs)))
        sshd, ssh_argv = start_sshd(root)
        baseline = timed(ssh_argv, dict(os.environ), args.runs) if ssh_argv else None
        print(f"\nremote `true`, median of {args.runs} runs, loopback\n")
        print("| path | median | vs ssh |\n|---|---|---|")
        for name, ms in rows:
            ratio = f"{ms / baseline:.2f}x" if baseline else "n/a"
            print(f"| {name} | {ms:.1f} ms | {ratio} |")
        print(f"| ssh 127.0.0.1 true (key auth, sshd on loopback) | "
              f"{f'{baseline:.1f} ms' if baseline else 'sshd not installed'} | 1.00x |")
    finally:
        if sshd is not None:
            sshd.terminate()
        for home in (laptop, web, cm):
            subprocess.run([MALAI, "stop"], env=dict(os.environ, MALAI_HOME=str(home)), capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
