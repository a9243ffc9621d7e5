"""Paths benchmark: round trip and throughput to a machine directly, through the relay, and over Tor.

    python bench/paths.py [--pings 50] [--mib 64]      (as root: it makes a network namespace)

Everything runs in a network namespace of its own: a private Tor network on
127.0.0.1 (tests/tor_network.py), a manager, web01 (a TCP listener and its
onion service) and the laptop's identity used from this process, which dials
web01 over one kind of hint at a time. Ping: AMP round trips on the link.
Throughput: a `tcp` stream to the service `source`, reading N MiB.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import MALAI, malai, status, table  # noqa: E402

SOURCE = r'''
import socket, threading
s = socket.create_server(("127.0.0.1", 7600))
chunk = b"x" * (1 << 16)
def serve(c):
    n = int(c.recv(64).split(b"\n")[0])
    while n > 0:
        n -= c.send(chunk[:min(n, len(chunk))])
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

CLIENT = r'''
import statistics, sys, time
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import clientFromString
import txtorcon
from malai.home import Home
from malai.cli.direct import DirectContext
from malai.peer.links import dial_ready
from malai.peer.ping import ping

home, target, control, pings, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
hints = sys.argv[6:]

class Sink(protocol.Protocol):
    """A tcp stream's bytes in; counts them."""
    def __init__(self):
        self.got, self.done = 0, defer.Deferred()
    def connectionMade(self):
        self.transport.write(f"{size}\n".encode())
    def dataReceived(self, data):
        self.got += len(data)
        if self.got >= size and not self.done.called:
            self.done.callback(None)

@defer.inlineCallbacks
def main():
    ctx = DirectContext(Home(__import__("pathlib").Path(home)), reactor)
    tor = yield txtorcon.connect(reactor, clientFromString(reactor, control))
    def via_tor(local, peer, hint):
        _, host, port = hint.split(":")
        return tor.stream_via(host, int(port))
    ctx.dialer.kinds["tor"] = via_tor
    svc = ctx.cluster("company")
    for hint in hints:
        link = yield dial_ready(ctx.dialer, svc.identity, target, ctx.pool.factory, [hint])
        rtts = []
        for _ in range(pings):
            rtts.append((yield ping(link)).rtt * 1000)
        sink = Sink()
        start = time.perf_counter()
        yield link.open("tcp", "source", sink)
        yield sink.done
        mbs = size / (time.perf_counter() - start) / 1e6
        link.close("measured")
        print(hint.split(":")[0], statistics.median(rtts), mbs, flush=True)
    reactor.stop()

reactor.callWhenRunning(lambda: main().addErrback(lambda f: (print(f, file=sys.stderr), reactor.stop())))
reactor.run()
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=50)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("tor") or not shutil.which("ip"):
        print("bench/paths.py skipped: it needs root (it makes a network namespace so that nothing leaves the "
              "machine), iproute2 and tor")
        return 0
    from tests.tor_network import TorNetwork

    ns = f"mbench{os.getpid()}"
    root = Path(tempfile.mkdtemp(prefix="malai-bench-", dir="/tmp"))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    inside = ["ip", "netns", "exec", ns]
    net = TorNetwork(root / "tor", ns)
    homes = {name: root / name for name in ("cm", "web01", "laptop")}
    source = None
    try:
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        net.start()
        print(f"  private Tor network bootstrapped in {net.wait_bootstrapped():.0f} s", flush=True)
        source = subprocess.Popen([*inside, sys.executable, "-c", SOURCE])
        cm_id52 = malai(homes["cm"], "cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        ids = {}
        for name in ("web01", "laptop"):
            out = malai(homes[name], "machine", "init", cm_id52, "company", "--addr", "127.0.0.1:7420", "--name", name)
            ids[name] = out.split("machine ID52: ")[1].split()[0]
        config = homes["cm"] / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + (
            f'\n[machine.web01]\nid52 = "{ids["web01"]}"\nallow_from = "laptop"\n'
            '\n[machine.web01.tcp.source]\nport = 7600\nallow_from = "laptop"\n'
            f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'))
        (homes["web01"] / "malai.toml").write_text(f'[tor]\ncontrol = "{net.control("hs")}"\n')
        env = dict(os.environ)
        for name, listen in (("cm", "tcp:7420:interface=127.0.0.1"), ("web01", "tcp:7421:interface=127.0.0.1")):
            subprocess.run([*inside, MALAI, "daemon", "--listen", listen], check=True,
                           env=dict(env, MALAI_HOME=str(homes[name])), capture_output=True)
        from malai.p2p.onion import onion_address

        onion = onion_address(ids["web01"])
        deadline = time.monotonic() + 120
        while status(homes["web01"])["onions"] != [onion] or status(homes["cm"])["clusters"][0]["links"] < 1:
            if time.monotonic() > deadline:
                sys.exit("web01's onion service did not come up within 120 s")
            time.sleep(0.5)
        hints = ["tcp:127.0.0.1:7421", f"relay:{cm_id52}", f"tor:{onion}:7420"]
        out = subprocess.run([*inside, sys.executable, "-c", CLIENT, str(homes["laptop"]), ids["web01"],
                              net.control("client"), str(args.pings), str(args.mib << 20), *hints],
                             capture_output=True, text=True, env=dict(env, PYTHONPATH=str(Path(__file__).parent.parent)))
        if out.returncode or not out.stdout.strip():
            sys.exit(f"the client failed: {out.stderr}")
        results = {kind: (float(rtt), float(mbs)) for kind, rtt, mbs in (line.split() for line in out.stdout.split("\n")
                                                                          if line.strip())}
        direct = results["tcp"]
        rows = [(name, f"{results[k][0]:.2f} ms", f"{results[k][0] / direct[0]:.1f}x", f"{results[k][1]:.1f} MB/s",
                 f"{results[k][1] / direct[1]:.3f}x")
                for k, name in (("tcp", "direct (tcp)"), ("relay", "relay via the manager"),
                                ("tor", "Tor onion service (private network)"))]
        table(f"paths to web01 on loopback: median of {args.pings} pings, {args.mib} MiB through a TCP stream",
              ("path", "round trip", "vs direct", "throughput", "vs direct"), rows)
    finally:
        for home in homes.values():
            subprocess.run([MALAI, "stop"], env=dict(os.environ, MALAI_HOME=str(home)), capture_output=True)
        if source is not None:
            source.kill()
        net.stop()
        subprocess.run(["ip", "netns", "del", ns])
    return 0


if __name__ == "__main__":
    sys.exit(main())
