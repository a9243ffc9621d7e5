"""Config push benchmark: how long N machines take to converge, at start and after a change.

    python bench/config_push.py [--machines 50] [--daemons 1] [--timeout 300]

Real daemons on loopback: a cluster manager whose ``cluster.toml`` lists N
machines before it starts, and K machine daemons holding the N machine
identities between them (one cluster folder each, as a device in many
clusters would). Measures how long the manager takes to serve (its control
socket answers), the first convergence after the machine daemons start, and
the convergence after a change that touches every machine's config, with the
manager's resident memory and CPU time. Waiting is ``malai rescan --wait``.

The machine daemons start one after another, each once the manager holds the
links of those before: every identity dials from 127.0.0.1, and the manager
lets one address have 128 TLS handshakes in progress (real machines come from
addresses of their own). Each machine daemon applies its identities' configs
one after another, each written with two fsyncs: with many identities per
daemon that, not the manager, bounds the convergence (see the manager's CPU).
``--tmpfs`` puts the machine daemons' homes in /dev/shm, where an fsync costs
nothing, as if each machine wrote to a disk of its own.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MALAI, free_port, malai, status

from malai.config.cluster_info import render_cluster_info
from malai.config.models import ClusterInfo
from malai.identity import Identity


def wait_in_sync(cm: Path, timeout: float) -> float:
    """Seconds until every machine acked (``malai rescan --wait``, its progress bar on stderr)."""
    start = time.perf_counter()
    r = subprocess.run([MALAI, "rescan", "company", "--wait", "--timeout", str(timeout)],
                       env=dict(os.environ, MALAI_HOME=str(cm)), stdout=subprocess.PIPE, text=True)
    if r.returncode:
        sys.exit(f"no convergence within {timeout:g} s:\n{r.stdout}")
    return time.perf_counter() - start


def wait_links(cm: Path, links: int, timeout: float) -> None:
    """Until the manager holds ``links`` links (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = re.search(r", (\d+) links", malai(cm, "status"))  # the summary: cheaper than --json
        if held and int(held[1]) >= links:
            return
        time.sleep(0.5)


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
    parser.add_argument("--tmpfs", action="store_true", help="machine daemons' homes in /dev/shm")
    args = parser.parse_args()
    n, k = args.machines, max(1, min(args.daemons, args.machines))
    root = Path(tempfile.mkdtemp(prefix="malai-bench-", dir="/tmp"))
    machines = Path(tempfile.mkdtemp(prefix="malai-bench-", dir="/dev/shm")) if args.tmpfs else root
    cm, homes = root / "cm", [machines / f"d{j}" for j in range(k)]
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
            (folder / "cluster-info.toml").write_text(render_cluster_info(info))
            entries.append(f'\n[machine.m{i}]\nid52 = "{identity.id52}"\nallow_from = "m0"\n')
        config = cm / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + "".join(entries))
        start = time.perf_counter()
        malai(cm, "daemon", "--timeout", "600", "--listen", f"tcp:{cm_addr.split(':')[1]}:interface=127.0.0.1")
        serving = time.perf_counter() - start
        pid = status(cm)["pid"]
        rss_start, cpu_start = usage(pid)
        print(f"{n} machines ({k} daemon{'s' * (k > 1)}{', on tmpfs' * args.tmpfs}), 1 cluster manager, loopback")
        start = time.perf_counter()
        for j, home in enumerate(homes):
            malai(home, "daemon", "--timeout", "600", "--listen", "tcp:0:interface=127.0.0.1")
            wait_links(cm, len(range(j, n, k)) + sum(len(range(i, n, k)) for i in range(j)), 120)
        first = time.perf_counter() - start + wait_in_sync(cm, args.timeout)
        rss_first, cpu_first = usage(pid)
        config.write_text(config.read_text().replace('allow_from = "m0"', 'allow_from = "m0, m1"'))
        start = time.perf_counter()
        malai(cm, "rescan", "company")
        rescan = time.perf_counter() - start
        wait_in_sync(cm, args.timeout)
        total = time.perf_counter() - start
        time.sleep(2)
        rss_idle, cpu_idle = usage(pid)
        time.sleep(10)
        cpu_rest = usage(pid)[1] - cpu_idle
        print("\n| measure | value |\n|---|---|")
        print(f"| manager serving after `malai daemon` (its control socket answers) | {serving:.2f} s |")
        print(f"| first config to {n} machines from the first machine daemon's start | {first:.2f} s |")
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
        if args.tmpfs:
            shutil.rmtree(machines, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
