"""HTTP forwarding benchmark: malai's HTTP front vs the upstream directly vs an nginx reverse proxy.

    python bench/http_forward.py [--seconds 5] [--connections 10] [--gib 1]

An nginx of this run's own is the upstream (a 100-byte page and a sparse
1 GiB file) and, on a second port, a keep-alive reverse proxy in front of it.
Real malai daemons on loopback put the upstream behind web01's
`[machine.web01.http.site]`; the laptop's HTTP front reaches it by name.
`wrk` measures requests per second and p50/p99 latency; `curl` the download.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Cluster, free_port, malai, table, wait_listening

NGINX = """
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    upstream site {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{upstream};
        root {root}/www;
    }}
    server {{
        listen 127.0.0.1:{proxy};
        location / {{
            proxy_pass http://site;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def wrk(url: str, host: str, seconds: float, connections: int):
    """(requests per second, p50 ms, p99 ms)."""
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}", url],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        sys.exit(f"{url} answered errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def percentile(p):
        value, unit = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    return rps, percentile(50), percentile(99)


def download(url: str, host: str) -> float:
    """MB/s of a curl download."""
    out = subprocess.run(["curl", "-fsS", "-o", "/dev/null", "-H", f"Host: {host}", "-w", "%{speed_download}", url],
                         capture_output=True, text=True, check=True).stdout
    return float(out) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--gib", type=float, default=1)
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench/http_forward.py skipped: {tool} is not installed (apt-get install nginx-light wrk)")
            return 0
    root = Path(tempfile.mkdtemp(prefix="malai-bench-", dir="/tmp"))
    root.chmod(0o755)  # nginx workers run as nobody
    (root / "www").mkdir()
    (root / "www" / "small").write_bytes(b"x" * 100)
    with open(root / "www" / "big", "wb") as f:
        f.truncate(int(args.gib * (1 << 30)))  # sparse: nginx sends zeros, no disk used
    upstream, proxy, front = free_port(), free_port(), free_port()
    (root / "nginx.conf").write_text(NGINX.format(root=root, upstream=upstream, proxy=proxy))
    nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(root), "-c",
                              str(root / "nginx.conf"), "-g", "daemon off;"])

    def config(ids, ports):
        return (f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["127.0.0.1:{ports["web01"]}"]\n'
                f'\n[machine.web01.http.site]\nport = {upstream}\nallow_from = "laptop"\n'
                f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n')

    try:
        wait_listening(upstream)
        with Cluster(root, ("web01", "laptop"), config) as cluster:
            malai(cluster.homes["laptop"], "service", "add", "http", f"127.0.0.1:{front}")
            wait_listening(front)
            paths = {
                "direct to the upstream": (upstream, f"127.0.0.1:{upstream}"),
                "nginx reverse proxy (keep-alive upstream)": (proxy, f"127.0.0.1:{proxy}"),
                "malai HTTP front → web01": (front, f"site.company.localhost:{front}"),
            }
            results = {}
            for name, (port, host) in paths.items():
                print(f"  {name}: wrk {args.seconds:g} s, {args.connections} connections; "
                      f"{args.gib:g} GiB download…", flush=True)
                rps, p50, p99 = wrk(f"http://127.0.0.1:{port}/small", host, args.seconds, args.connections)
                results[name] = (rps, p50, p99, download(f"http://127.0.0.1:{port}/big", host))
            base = results["direct to the upstream"]
            nginx_row = results["nginx reverse proxy (keep-alive upstream)"]
            rows = [(name, f"{rps:.0f}", f"{p50:.2f} ms", f"{p99:.2f} ms", f"{mbs:.0f} MB/s",
                     f"{rps / base[0]:.2f}x / {mbs / base[3]:.2f}x",
                     f"{rps / nginx_row[0]:.2f}x / {mbs / nginx_row[3]:.2f}x")
                    for name, (rps, p50, p99, mbs) in results.items()]
            table(f"HTTP on loopback: 100-byte page, wrk -c{args.connections} for {args.seconds:g} s; "
                  f"{args.gib:g} GiB download with curl",
                  ("path", "requests/s", "p50", "p99", "download", "vs direct (req/s / MB/s)",
                   "vs nginx (req/s / MB/s)"), rows)
    finally:
        nginx.terminate()
        nginx.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
