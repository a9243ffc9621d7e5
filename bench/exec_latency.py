"""Remote command latency: `malai <machine> true` through the daemon and direct, against `ssh host true`.

    python bench/exec_latency.py [--runs 30]

Real daemons on loopback (a manager, a machine, a laptop) and an sshd of this
run's own on a loopback port with a fresh key. Medians and ratios to ssh.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MALAI, Cluster, Sshd, malai, table


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="malai-bench-", dir="/tmp"))

    def config(ids, ports):
        return (f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["127.0.0.1:{ports["web01"]}"]\n'
                f'allow_from = "laptop"\n\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n')

    with Cluster(root, ("web01", "laptop"), config) as cluster, Sshd(root) as sshd:
        laptop = cluster.homes["laptop"]
        env = dict(os.environ, MALAI_HOME=str(laptop))
        argv = [MALAI, "web01.company", "true"]
        rows = [("malai web01.company true (through the daemon)", timed(argv, env, args.runs))]
        malai(laptop, "stop")
        rows.append(("malai web01.company true (no daemon: dials directly)", timed(argv, env, args.runs)))
        baseline = timed([*sshd.argv, "true"], dict(os.environ), args.runs) if sshd.argv else None
        out = [(name, f"{ms:.1f} ms", f"{ms / baseline:.2f}x" if baseline else "n/a") for name, ms in rows]
        out.append(("ssh 127.0.0.1 true (key auth, sshd on loopback)",
                    f"{baseline:.1f} ms" if baseline else "sshd not installed", "1.00x"))
        table(f"remote `true`, median of {args.runs} runs, loopback", ("path", "median", "vs ssh"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
