"""TCP forwarding benchmark: malai forward vs direct TCP vs `ssh -L`, in the same run.

    python bench/tcp_forward.py [--mib 1024] [--seconds 3]

Real daemons on loopback (a manager, db01 exposing the upstreams, a laptop
holding the forward) and an sshd of this run's own. The upstream runs in a
child process: it streams the requested number of bytes, or echoes. Measures
bulk download throughput, request/response rate on one connection, new
connections per second (connect, one exchange, close), and, with redis-server
installed, redis-benchmark GET with 20 connections against a real Redis.
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Cluster, Sshd, free_port, malai, table, wait_listening

UPSTREAM = r'''
import socket, sys, threading
CHUNK = memoryview(b"x" * (1 << 20))
def source(conn):
    line = conn.recv(64).split(b"\n")[0]
    if not line:
        return
    n = int(line)
    while n > 0:
        n -= conn.send(CHUNK[:min(n, len(CHUNK))])
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
def echo(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)
def serve(sock, handle):
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=lambda c=conn: (handle(c), c.close()), daemon=True).start()
ports = []
for handle in (source, echo):
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    ports.append(sock.getsockname()[1])
    threading.Thread(target=serve, args=(sock, handle), daemon=True).start()
print(*ports, flush=True)
sys.stdin.read()
'''


def download(port: int, size: int) -> float:
    """MB/s reading ``size`` bytes from the source upstream through ``port``."""
    buf = bytearray(1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        s.sendall(f"{size}\n".encode())
        got = 0
        while got < size:
            n = s.recv_into(buf)
            if not n:
                sys.exit(f"the stream through port {port} ended after {got} of {size} bytes")
            got += n
        return size / (time.perf_counter() - start) / 1e6


def round_trips(port: int, seconds: float) -> float:
    """64-byte request/response exchanges per second on one connection."""
    message = b"m" * 64
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            s.sendall(message)
            got = 0
            while got < len(message):
                got += len(s.recv(4096))
            count += 1
        return count / (time.perf_counter() - start)


def connections(port: int, seconds: float) -> float:
    """New connections per second, each with one exchange."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"hi")
            if s.recv(2) != b"hi":
                sys.exit(f"no echo through port {port}")
        count += 1
    return count / (time.perf_counter() - start)


def _ratios(measured, baseline) -> str:
    return " / ".join(f"{m / b:.2f}x" if b else "n/a" for m, b in zip(measured, baseline, strict=True))


def redis_gets(port: int, requests: int) -> float:
    """redis-benchmark GET requests per second with 20 connections through ``port``."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "get", "-c", "20", "-n", str(requests), "--csv"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1].split(",")[1].strip('"'))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="bulk transfer size (default 1024 MiB)")
    parser.add_argument("--seconds", type=float, default=3, help="how long each rate is measured")
    parser.add_argument("--redis-requests", type=int, default=100000, help="redis-benchmark GETs per path")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="malai-bench-", dir="/tmp"))
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
    source, echo = map(int, upstream.stdout.readline().split())
    redis = free_port() if shutil.which("redis-server") and shutil.which("redis-benchmark") else None
    redis_server = None
    if redis is not None:
        redis_server = subprocess.Popen(["redis-server", "--port", str(redis), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(root)], stdout=subprocess.DEVNULL)
        wait_listening(redis)

    def config(ids, ports):
        return (f'\n[machine.db01]\nid52 = "{ids["db01"]}"\naddrs = ["127.0.0.1:{ports["db01"]}"]\n'
                f'\n[machine.db01.tcp.source]\nport = {source}\nallow_from = "laptop"\n'
                f'\n[machine.db01.tcp.echo]\nport = {echo}\nallow_from = "laptop"\n'
                + (f'\n[machine.db01.tcp.redis]\nport = {redis}\nallow_from = "laptop"\n' if redis else "")
                + f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n')

    try:
        with Cluster(root, ("db01", "laptop"), config) as cluster, Sshd(root) as sshd:
            paths = {"direct TCP": (source, echo, redis)}
            local = {name: free_port() for name in ("source", "echo", "redis")[:3 if redis else 2]}
            for name, port in local.items():
                malai(cluster.homes["laptop"], "service", "add", "tcp", name, f"127.0.0.1:{port}",
                      f"{name}.db01.company")
            paths["malai forward"] = (local["source"], local["echo"], local.get("redis"))
            tunnel = None
            if sshd.argv:
                ssh_ports = free_port(), free_port(), free_port()
                forwards = [f"{ssh_ports[0]}:127.0.0.1:{source}", f"{ssh_ports[1]}:127.0.0.1:{echo}"]
                forwards += [f"{ssh_ports[2]}:127.0.0.1:{redis}"] if redis else []
                tunnel = subprocess.Popen([*sshd.argv, "-N", *(a for f in forwards for a in ("-L", f))])
                for port in ssh_ports[:len(forwards)]:
                    wait_listening(port)
                paths["ssh -L"] = (*ssh_ports[:2], ssh_ports[2] if redis else None)
            size = args.mib << 20
            results = {}
            for name, (source_port, echo_port, redis_port) in paths.items():
                print(f"  {name}: {args.mib} MiB download, request/response, new connections, redis…", flush=True)
                results[name] = (download(source_port, size), round_trips(echo_port, args.seconds),
                                 connections(echo_port, args.seconds),
                                 redis_gets(redis_port, args.redis_requests) if redis_port else 0.0)
            if tunnel is not None:
                tunnel.terminate()
            base = results["direct TCP"]
            ssh = results.get("ssh -L")
            rows = []
            for name, measured in results.items():
                ratios = _ratios(measured, base)
                vs_ssh = f" ({_ratios(measured, ssh)})" if ssh else ""
                mbs, rtts, conns, gets = measured
                rows.append((name, f"{mbs:.0f} MB/s", f"{rtts:.0f}/s", f"{conns:.0f}/s",
                             f"{gets:.0f}/s" if gets else "n/a", ratios + vs_ssh))
            table(f"TCP forward on loopback: {args.mib} MiB download, 64-byte round trips on one connection, "
                  "new connections (one exchange each), redis-benchmark GET -c 20",
                  ("path", "download", "round trips", "connections", "redis GET", "vs direct (vs ssh -L)"), rows)
    finally:
        upstream.kill()
        if redis_server is not None:
            redis_server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
