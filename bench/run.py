"""Run every benchmark in bench/ (``make bench``)."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = ["peer_link.py", "config_push.py", "exec_latency.py", "tcp_forward.py", "http_forward.py",
              "ssh_tools.py", "paths.py"]

if __name__ == "__main__":
    here = Path(__file__).parent
    codes = [subprocess.call([sys.executable, str(here / name)]) for name in BENCHMARKS]
    sys.exit(max(codes))
