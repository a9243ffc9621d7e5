"""Config push benchmark: how long N machines take to converge, at start and after a change.

    python bench/config_push.py [--machines 50] [--daemons 1] [--timeout 300]

Real daemons on loopback: a cluster manager whose ``cluster.toml`` lists N
machines before it starts, and K machine daemons holding the N machine
identities between them (one cluster folder each, as a device in many
clusters would). Measures how long the manager takes to serve (its control
socket answers), the first convergence after the machine daemons start, and
the convergence after a change that touches every machine's config, with the
manager's resident memory and CPU time.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MALAI, free_port, malai, status

from malai.atomic import write_atomic
from malai.config.cluster_info import render_cluster_info
from malai.config.models import ClusterInfo
from malai.identity import Identity


def synced(cm: Path, version_at_least: int) -> int:
    """How many machines the manager counts in sync at ``version_at_least`` or later."""
    sync = status(cm)["clusters"][0]["sync"]
    return sum(1 for m in sync if m["sync"] == "in sync" and m["version"] >= version_at_least)


def wait_in_sync(cm: Path, n: int, version_at_least: int, timeout: float) -> float:
    start = time.perf_counter()
    while True:
        done = synced(cm, version_at_least)
        print(f"\r  {done}/{n} machines in sync", end="", flush=True)
        if done == n:
            print()
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            sys.exit(f"\nno convergence within {timeout:g} s ({done}/{n})")
        time.sleep(0.2)


def usage(pid: int) -> tuple:
    """The process's resident memory (MB) and CPU time so far (s)."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss / 1024, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=50)
    parser.add_argument("--daemons", type=int, default=1, help="machine daemons sharing the identities")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each convergence")
    args = parser.parse_args()
    n, k = args.machines, max(1, min(args.daemons, args.machines))
    root = Path(tempfile.mkdtemp(prefix="malai-bench-", dir="/tmp"))
    cm, homes = root / "cm", [root / f"d{j}" for j in range(k)]
    try:
        cm_id52 = malai(cm, "cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        cm_addr = f"127.0.0.1:{free_port()}"
        entries = []
        for i in range(n):
            identity = Identity.generate()
            folder = homes[i % k] / "clusters" / f"m{i}"
            folder.mkdir(parents=True)
            identity.save(folder / "machine.private-key")
            info = ClusterInfo(f"m{i}", cm_id52, (cm_addr,), f"m{i}")
            write_atomic(folder / "cluster-info.toml", render_cluster_info(info).encode())
            entries.append(f'\n[machine.m{i}]\nid52 = "{identity.id52}"\nallow_from = "m0"\n')
        config = cm / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + "".join(entries))
        start = time.perf_counter()
        malai(cm, "daemon", "--timeout", "600", "--listen", f"tcp:{cm_addr.split(':')[1]}:interface=127.0.0.1")
        serving = time.perf_counter() - start
        pid = status(cm)["pid"]
        rss_start, cpu_start = usage(pid)
        for home in homes:
            malai(home, "daemon", "--timeout", "600", "--listen", "tcp:0:interface=127.0.0.1")
        print(f"{n} machines ({k} daemon{'s' * (k > 1)}), 1 cluster manager, loopback")
        first = wait_in_sync(cm, n, 1, args.timeout)
        rss_first, cpu_first = usage(pid)
        version = status(cm)["clusters"][0]["config_version"]
        config.write_text(config.read_text().replace('allow_from = "m0"', 'allow_from = "m0, m1"'))
        start = time.perf_counter()
        malai(cm, "rescan", "company")
        rescan = time.perf_counter() - start
        change = wait_in_sync(cm, n, version + 1, args.timeout)
        total = time.perf_counter() - start
        time.sleep(2)
        rss_idle, cpu_idle = usage(pid)
        time.sleep(10)
        cpu_rest = usage(pid)[1] - cpu_idle
        print("\n| measure | value |\n|---|---|")
        print(f"| manager serving after `malai daemon` (its control socket answers) | {serving:.2f} s |")
        print(f"| first config to {n} machines after their daemons start | {first:.2f} s |")
        print(f"| change touching all {n} machines: rescan until all acked | {total:.2f} s |")
        print(f"| of which `malai rescan` itself | {rescan:.2f} s |")
        print(f"| manager RSS: serving / after first config / idle after the change | "
              f"{rss_start:.0f} / {rss_first:.0f} / {rss_idle:.0f} MB |")
        print(f"| manager CPU: start / first config / change | {cpu_start:.1f} / {cpu_first - cpu_start:.1f} / "
              f"{cpu_idle - cpu_first:.1f} s |")
        print(f"| manager CPU idle, {n} links held | {100 * cpu_rest / 10:.1f} % |")
    finally:
        for home in (*homes, cm):
            subprocess.run([MALAI, "stop"], env=dict(os.environ, MALAI_HOME=str(home)), capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
