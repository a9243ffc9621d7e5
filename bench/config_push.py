"""Config push benchmark: how long N machines take to converge after a change.

    python bench/config_push.py [--machines 50]

Real daemons on loopback: a cluster manager, and one machine daemon holding
N machine identities (one cluster folder each, as a device in N clusters
would). Measures the first convergence after the daemons start, and the
convergence after a change that touches every machine's config.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MALAI, malai, status

from malai.atomic import write_atomic
from malai.config.cluster_info import render_cluster_info
from malai.config.models import ClusterInfo
from malai.identity import Identity


def wait_in_sync(cm: Path, n: int, version_at_least: int) -> float:
    start = time.perf_counter()
    while True:
        cluster = status(cm)["clusters"][0]
        done = [m for m in cluster["sync"] if m["sync"] == "in sync" and m["version"] >= version_at_least]
        print(f"\r  {len(done)}/{n} machines in sync", end="", flush=True)
        if len(done) == n:
            print()
            return time.perf_counter() - start
        if time.perf_counter() - start > 300:
            sys.exit("\nno convergence within 300 s")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=50)
    args = parser.parse_args()
    n = args.machines
    root = Path(tempfile.mkdtemp(prefix="malai-bench-", dir="/tmp"))
    cm, machines = root / "cm", root / "m"
    try:
        cm_id52 = malai(cm, "cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        malai(cm, "daemon", "--listen", "tcp:0:interface=127.0.0.1")
        cm_addr = status(cm)["listen"][0]
        entries = []
        for i in range(n):
            identity = Identity.generate()
            folder = machines / "clusters" / f"m{i}"
            folder.mkdir(parents=True)
            identity.save(folder / "machine.private-key")
            info = ClusterInfo(f"m{i}", cm_id52, (cm_addr,), f"m{i}")
            write_atomic(folder / "cluster-info.toml", render_cluster_info(info).encode())
            entries.append(f'\n[machine.m{i}]\nid52 = "{identity.id52}"\nallow_from = "m0"\n')
        config = cm / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + "".join(entries))
        malai(cm, "rescan")
        malai(machines, "daemon", "--listen", "tcp:0:interface=127.0.0.1")
        print(f"{n} machines (one daemon), 1 cluster manager, loopback")
        first = wait_in_sync(cm, n, 1)
        version = status(cm)["clusters"][0]["config_version"]
        config.write_text(config.read_text().replace('allow_from = "m0"', 'allow_from = "m0, m1"'))
        start = time.perf_counter()
        malai(cm, "rescan", "company")
        change = wait_in_sync(cm, n, version + 1)
        total = time.perf_counter() - start
        print("\n| measure | seconds |\n|---|---|")
        print(f"| first config to {n} machines after start | {first:.2f} |")
        print(f"| change touching all {n} machines: rescan until all acked | {total:.2f} |")
        print(f"| of which waiting after `malai rescan` returned | {change:.2f} |")
    finally:
        for home in (machines, cm):
            subprocess.run([MALAI, "stop"], env=dict(os.environ, MALAI_HOME=str(home)), capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
