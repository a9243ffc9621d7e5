"""Multiplexed link benchmark: one HTTP/2 link (malai/peer/mux.py) vs a TLS link per stream vs ``ssh -L``.

    python bench/mux_link.py [--mib 1024] [--count 2000] [--repeat 3] [--only bulk,rtt,...] [--sweep]

The server runs in a child process, the link and the per-stream TLS links over real pinned
TLS on loopback, ``ssh -L`` through an sshd of the run's own to the server's TCP port (left
out without sshd), all in the same run: bulk throughput of one stream (and each side's CPU
seconds per GB), 64-byte round trips on one stream, stream opens per second (one exchange
each; listener-opened streams too), an AMP call on the control stream vs one stream per
call, and round trips on one stream while another on the same connection carries a bulk
transfer. Bulk and round trips run ``--repeat`` times, interleaved across the paths, and
the median is shown. The per-stream path is a fresh verified TLS link per stream (what
spare links hid; without the Hello and OpenStream round trips it also needed, so the old
path is flattered). ``--sweep`` times one stream's bulk transfer under several window and
frame sizes. docs/mux-performance.md has figures and how to read them on a shared machine.
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import attrs
from common import Sshd, free_port, table, wait_listening
from peer_link import Bulk
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols import amp

from malai.identity import Identity
from malai.p2p.link import connect_verified, server_factory
from malai.p2p.tls import PeerTLS
from malai.peer.commands import Ping
from malai.peer.mux import MuxLinkFactory, MuxSettings, StreamRefused
from malai.peer.protocol import HelloInfo, PeerAMPFactory

SERVER = Identity.from_hex("11" * 32)
CLIENT = Identity.from_hex("22" * 32)


# -- both sides ---------------------------------------------------------------------------
class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Sink(protocol.Protocol):
    """Counts ``expected`` bytes, then answers ``done``."""

    def __init__(self, expected=None):
        self.expected, self.received, self.head = expected, 0, b""

    def dataReceived(self, data):
        self.received += len(data)
        if self.received >= self.expected:
            self.transport.write(b"done")


class PingAMP(amp.AMP):
    @Ping.responder
    def ping(self, payload):
        return {"payload": payload, "version": "bench"}


class Reverse(protocol.Protocol):
    """Opens ``count`` echo streams back to the dialer, one after another; reports the seconds taken."""

    def __init__(self, link, count):
        self.link, self.count = link, count

    @defer.inlineCallbacks
    def connectionMade(self):
        start = time.perf_counter()
        for _ in range(self.count):
            yield one_exchange(lambda p: self.link.open("echo", "", p))
        self.transport.write(f"{time.perf_counter() - start}\n".encode())


class PlainServer(protocol.Protocol):
    """The per-stream path: a first line says ``sink N`` or ``echo``."""

    def connectionMade(self):
        self.buffer, self.inner = b"", None

    def dataReceived(self, data):
        if self.inner is None:
            self.buffer += data
            if b"\n" not in self.buffer:
                return
            line, _, data = self.buffer.partition(b"\n")
            mode, _, arg = line.partition(b" ")
            self.inner = Sink(int(arg)) if mode == b"sink" else Echo()
            self.inner.makeConnection(self.transport)
            if not data:
                return
        self.inner.dataReceived(data)


def settings_from(args) -> MuxSettings:
    return MuxSettings(stream_window=args.stream_window, link_window=args.link_window, max_frame_size=args.frame)


def pin(cpu):
    """Keep this process on one core (of two or more): each side gets its own, the same every run."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[cpu]})


def serve(args):
    if args.pin:
        pin(1)
    tls = PeerTLS([SERVER])
    links = {}

    def respond(request):
        if request.kind == "sink":
            return Sink(int(request.target))
        if request.kind == "echo":
            return Echo()
        if request.kind == "amp":
            return PingAMP()
        if request.kind == "reverse":
            return Reverse(links[request.peer.peer], int(request.target))
        raise StreamRefused(f"no {request.kind} here", "NOT_ALLOWED")

    factory = MuxLinkFactory(False, respond, PeerAMPFactory(HelloInfo(), dialer=False).buildProtocol,
                             settings_from(args))

    def route(addr):
        link = links[addr.peer] = factory.buildProtocol(addr)
        return link

    mux_port = reactor.listenTCP(0, server_factory(tls, route), interface="127.0.0.1")
    plain = protocol.Factory.forProtocol(PlainServer)
    plain_port = reactor.listenTCP(0, server_factory(tls, plain.buildProtocol), interface="127.0.0.1")
    tcp_port = reactor.listenTCP(0, plain, interface="127.0.0.1")  # what ssh -L forwards to
    print(mux_port.getHost().port, plain_port.getHost().port, tcp_port.getHost().port, flush=True)
    reactor.run()


# -- the client ------------------------------------------------------------------------------
CLIENT_TLS = PeerTLS([CLIENT])


class Client(protocol.Protocol):
    """Collects what arrives; ``wait(n)`` fires once ``n`` more bytes came."""

    def __init__(self):
        self.buffer = b""
        self._want = None

    def dataReceived(self, data):
        self.buffer += data
        if self._want is not None and len(self.buffer) >= self._want[0]:
            (_, d), self._want = self._want, None
            d.callback(self.buffer)

    def wait(self, size):
        d = defer.Deferred()
        if len(self.buffer) >= size:
            d.callback(self.buffer)
        else:
            self._want = (size, d)
        return d


class ClientFactory(protocol.Factory):
    protocol = Client


def tls_connect(port):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return connect_verified(CLIENT_TLS, CLIENT, SERVER.id52, endpoint, ClientFactory())


@defer.inlineCallbacks
def one_exchange(opener):
    client = Client()
    yield opener(client)
    client.transport.write(b"x")
    yield client.wait(1)
    client.transport.loseConnection()


@defer.inlineCallbacks
def bulk(client, total):
    start = time.perf_counter()
    client.transport.registerProducer(Bulk(client.transport, total), False)
    yield client.wait(4)
    return total / (time.perf_counter() - start) / 1e6


@defer.inlineCallbacks
def round_trips(client, count):
    times = []
    message = b"m" * 64
    for _ in range(count):
        start = time.perf_counter()
        client.buffer = b""
        client.transport.write(message)
        yield client.wait(64)
        times.append(time.perf_counter() - start)
    return times


def summary(times):
    ordered = sorted(times)
    return statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6, len(times) / sum(times)


@defer.inlineCallbacks
def timed(count, action):
    start = time.perf_counter()
    for _ in range(count):
        yield action()
    return count / (time.perf_counter() - start)


@defer.inlineCallbacks
def connect_link(port, args):
    factory = MuxLinkFactory(True, lambda request: Echo(), PeerAMPFactory(HelloInfo(), dialer=True).buildProtocol,
                             settings_from(args))
    link = yield connect_verified(CLIENT_TLS, CLIENT, SERVER.id52, TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                  factory)
    yield link.ready
    yield link.control.ready
    return link


PHASES = ("bulk", "rtt", "opens", "amp", "beside")


@attrs.frozen
class Route:
    """One way to carry a stream: ``connect(kind, arg)`` fires with a connected ``Client``
    whose stream the server answers as ``kind`` (``echo``, ``sink``)."""

    name: str
    connect: Callable[[str, str], defer.Deferred]


def mux_path(link) -> Route:
    def connect(kind, arg):
        client = Client()
        return link.open(kind, arg, client)
    return Route("one HTTP/2 link", connect)


def line_path(name, connector) -> Route:
    """A connection per stream whose first line names its kind."""

    @defer.inlineCallbacks
    def connect(kind, arg):
        client = yield connector()
        client.transport.write(f"{kind} {arg}\n".encode())
        return client
    return Route(name, connect)


def tcp_connect(port):
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(ClientFactory())


def cpu_seconds(pid="self"):
    """User and system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@defer.inlineCallbacks
def measure_bulk(path, total, server_pid):
    """(MB/s, CPU seconds per GB of this process (the sender), of the server (the receiver))."""
    client = yield path.connect("sink", str(total))
    before = cpu_seconds(), cpu_seconds(server_pid)
    rate = yield bulk(client, total)
    gb = total / 1e9
    cpu = (cpu_seconds() - before[0]) / gb, (cpu_seconds(server_pid) - before[1]) / gb
    client.transport.loseConnection()
    return rate, *cpu


@defer.inlineCallbacks
def measure_rtt(path, count):
    client = yield path.connect("echo", "")
    times = yield round_trips(client, count)
    client.transport.loseConnection()
    return summary(times)


@defer.inlineCallbacks
def measure_opens(path, count):
    @defer.inlineCallbacks
    def exchange():
        client = yield path.connect("echo", "")
        client.transport.write(b"x")
        yield client.wait(1)
        client.transport.loseConnection()
    return (yield timed(count, exchange))


@defer.inlineCallbacks
def measure_beside(path, total):
    """Round trips on one stream while another carries ``total`` bytes: (times, MB/s)."""
    interactive = yield path.connect("echo", "")
    background = yield path.connect("sink", str(total))
    bulk_done = bulk(background, total)
    times = []
    while not bulk_done.called:
        times.extend((yield round_trips(interactive, 50)))
    rate = yield bulk_done
    interactive.transport.loseConnection()
    background.transport.loseConnection()
    return times, rate


def median_of(runs, key=lambda run: run):
    """The run whose ``key`` is the median."""
    return sorted(runs, key=key)[len(runs) // 2]


def ratio(ours, theirs, higher_is_better=True):
    if not theirs or not ours or higher_is_better is None:
        return ""
    return f"{ours / theirs:.2f}x" if higher_is_better else f"{theirs / ours:.2f}x"


@defer.inlineCallbacks
def main(args, server_pid, mux_port, plain_port, ssh_port):
    total, count, only, repeat = args.mib << 20, args.count, args.only, args.repeat
    link = yield connect_link(mux_port, args)
    paths = [mux_path(link), line_path("TLS link per stream", lambda: tls_connect(plain_port))]
    if ssh_port:
        paths.append(line_path("ssh -L", lambda: tcp_connect(ssh_port)))
    if args.alone:  # for profiling
        paths, ssh_port = [paths[0] if args.alone == "mux" else paths[1]], None
    header = ("measure", *(p.name for p in paths), "HTTP/2 vs TLS", *(["HTTP/2 vs ssh -L"] if ssh_port else []))
    rows = []

    def row(label, values, fmt, higher_is_better=True):
        mux = values[0]
        vs_tls = ratio(mux, values[1], higher_is_better) if len(values) > 1 else ""
        vs_ssh = [ratio(mux, values[2], higher_is_better)] if ssh_port else []
        rows.append((label, *(fmt(v) for v in values), vs_tls, *vs_ssh))

    if "bulk" in only:
        runs = {p.name: [] for p in paths}
        for _ in range(repeat):  # interleaved, so that load from elsewhere hits every path alike
            for path in paths:
                runs[path.name].append((yield measure_bulk(path, total, server_pid)))
        bulks = [median_of(runs[p.name]) for p in paths]
        row(f"bulk {args.mib} MiB, one stream (median of {repeat})", [b[0] for b in bulks], lambda v: f"{v:.0f} MB/s")
        row("... CPU seconds per GB, sender / receiver (ssh -L: the Python ends only)", [b[1:] for b in bulks],
            lambda v: f"{v[0]:.2f} / {v[1]:.2f}", None)

    if "rtt" in only or "beside" in only:
        runs = {p.name: [] for p in paths}
        for _ in range(repeat if "rtt" in only else 1):
            for path in paths if "rtt" in only else paths[:1]:
                runs[path.name].append((yield measure_rtt(path, count)))
        rtts = {name: median_of(results, key=lambda r: r[2]) for name, results in runs.items() if results}
    if "rtt" in only:
        row(f"64-byte round trips on one stream, per second (median of {repeat})",
            [rtts[p.name][2] for p in paths], lambda v: f"{v:.0f}/s")
        row("... median", [rtts[p.name][0] for p in paths], lambda v: f"{v:.0f} µs", False)
        row("... p99", [rtts[p.name][1] for p in paths], lambda v: f"{v:.0f} µs", False)

    if "opens" in only:
        opens = []
        for path in paths:
            opens.append((yield measure_opens(path, count)))
        row("streams opened per second (one exchange each)", opens, lambda v: f"{v:.0f}/s")
        reverse = Client()
        yield link.open("reverse", str(count), reverse)
        line = yield reverse.wait(2)
        while not line.endswith(b"\n"):
            line = yield reverse.wait(len(line) + 1)
        rows.append(("... opened by the listener", f"{count / float(line):.0f}/s", *[""] * (len(header) - 2)))

    if rows:
        table(f"one HTTP/2 link vs a TLS link per stream vs ssh -L ({count} exchanges each; loopback, server in "
              "its own process)", header, rows)

    if "amp" in only:  # the control stream vs a stream per call
        calls = []
        for _ in range(count):
            start = time.perf_counter()
            yield link.callRemote(Ping, payload=b"p" * 8)
            calls.append(time.perf_counter() - start)
        per_call = []
        for _ in range(count):
            start = time.perf_counter()
            caller = amp.AMP()
            yield link.open("amp", "", caller)
            yield caller.callRemote(Ping, payload=b"p" * 8)
            caller.transport.loseConnection()
            per_call.append(time.perf_counter() - start)
        call, stream_call = summary(calls), summary(per_call)
        table("AMP Ping on the link", ("path", "median", "p99", "calls/s"), [
            ("on the long-lived control stream", f"{call[0]:.0f} µs", f"{call[1]:.0f} µs", f"{call[2]:.0f}/s"),
            ("a stream per call", f"{stream_call[0]:.0f} µs", f"{stream_call[1]:.0f} µs", f"{stream_call[2]:.0f}/s")])

    if "beside" in only:  # round trips beside a bulk transfer on the same link (the same ssh connection)
        beside_rows = [(f"{paths[0].name}, alone", f"{rtts[paths[0].name][0]:.0f} µs",
                        f"{rtts[paths[0].name][1]:.0f} µs", "")]
        for path in (paths[0], paths[-1]) if ssh_port else paths[:1]:
            times, rate = yield measure_beside(path, total)
            during = summary(times)
            beside_rows.append((f"{path.name}, beside the bulk stream ({len(times)} round trips)",
                                f"{during[0]:.0f} µs", f"{during[1]:.0f} µs", f"{rate:.0f} MB/s"))
        table(f"64-byte round trips on one stream while another on the same connection carries {args.mib} MiB",
              ("", "median", "p99", "bulk meanwhile"), beside_rows)


@defer.inlineCallbacks
def both_bulks(link, plain_port, total):
    """MB/s of one bulk transfer on a stream of ``link``, then on a TLS link of its own."""
    mux = yield measure_bulk(mux_path(link), total, "self")
    plain = yield measure_bulk(line_path("", lambda: tls_connect(plain_port)), total, "self")
    return mux[0], plain[0]


@defer.inlineCallbacks
def sweep_one(args, mux_port, plain_port):
    link = yield connect_link(mux_port, args)
    rates = yield both_bulks(link, plain_port, args.mib << 20)
    link.close("done")
    return rates


def start_server(args):
    argv = [sys.executable, __file__, "--serve", *(["--pin"] if args.pin else []),
            "--stream-window", str(args.stream_window), "--link-window", str(args.link_window), "--frame", str(args.frame)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    mux_port, plain_port, tcp_port = map(int, server.stdout.readline().split())
    return server, mux_port, plain_port, tcp_port


@defer.inlineCallbacks
def sweep(args):
    rows = []
    for window in args.windows:
        for frame in args.frames:
            args.stream_window, args.frame = window, frame
            args.link_window = max(window * 4, 32 << 20)
            server, mux_port, plain_port, _ = start_server(args)
            try:
                rates = []
                for _ in range(args.repeat):
                    rates.append((yield sweep_one(args, mux_port, plain_port)))
            finally:
                server.terminate()
                server.wait()
            rows.append((f"{window >> 10} KiB", f"{frame >> 10} KiB", " / ".join(f"{r:.0f}" for r, _ in rates),
                         " / ".join(f"{p:.0f}" for _, p in rates)))
    table(f"one stream's bulk transfer ({args.mib} MiB, MB/s) by stream window and frame size",
          ("stream window", "max frame", "HTTP/2 link", "TLS link (same run)"), rows)


def run():
    defaults = MuxSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="bulk transfer size in MiB (default 1024)")
    parser.add_argument("--count", type=int, default=2000, help="round trips, opens and calls (default 2000)")
    parser.add_argument("--only", type=lambda s: set(s.split(",")), default=set(PHASES),
                        help=f"measure only these, comma-separated (default all: {','.join(PHASES)})")
    parser.add_argument("--sweep", action="store_true", help="time bulk transfers by window and frame size")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each bulk and round-trip measurement, interleaved across paths (the median is "
                        "shown), and transfers per setting in --sweep (default 3)")
    parser.add_argument("--no-ssh", action="store_true", help="leave out the ssh -L baseline")
    parser.add_argument("--alone", choices=("mux", "tls"), help="measure one path alone (for profiling)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the client and the server to a core each (steadier on an idle machine, worse when "
                        "others load one of them)")
    parser.add_argument("--windows", type=lambda s: [int(k) << 10 for k in s.split(",")],
                        default="256,1024,2048,4096,8192", help="stream windows in KiB for --sweep")
    parser.add_argument("--frames", type=lambda s: [int(k) << 10 for k in s.split(",")], default="16,64,256",
                        help="frame sizes in KiB for --sweep")
    parser.add_argument("--stream-window", type=int, default=defaults.stream_window)
    parser.add_argument("--link-window", type=int, default=defaults.link_window)
    parser.add_argument("--frame", type=int, default=defaults.max_frame_size)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)
    failed = []
    if args.sweep:
        d = sweep(args)
        server = None
    else:
        server, mux_port, plain_port, tcp_port = start_server(args)
    with contextlib.ExitStack() as stack:
        ssh_port = None if args.sweep or args.no_ssh else ssh_forward(stack, tcp_port)  # ssh and sshd float
        if args.pin:
            pin(0)
        if not args.sweep:
            d = main(args, server.pid, mux_port, plain_port, ssh_port)
        d.addErrback(lambda f: (f.printTraceback(), failed.append(f)))
        d.addBoth(lambda _: reactor.stop())
        try:
            reactor.run()
        finally:
            if server is not None:
                server.terminate()
                server.wait()
    return 1 if failed else 0


def ssh_forward(stack, port):
    """``ssh -L`` to ``port`` through an sshd of this run's own: the local port, or None without sshd."""
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="malai-bench-")))
    sshd = stack.enter_context(Sshd(root))
    if not sshd.argv:
        print("no sshd: the ssh -L baseline is left out", file=sys.stderr)
        return None
    local = free_port()
    tunnel = subprocess.Popen([*sshd.argv, "-N", "-L", f"{local}:127.0.0.1:{port}"])
    stack.callback(lambda: (tunnel.terminate(), tunnel.wait()))
    wait_listening(local)
    return local


if __name__ == "__main__":
    sys.exit(run())
