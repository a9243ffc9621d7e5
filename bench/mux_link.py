"""Multiplexed link benchmark: one HTTP/2 link (malai/peer/mux.py) vs a TLS link per stream.

    python bench/mux_link.py [--mib 1024] [--count 2000] [--sweep]

The server runs in a child process (each side has its own core), both paths over real
pinned TLS on loopback, in the same run: bulk throughput of one stream, 64-byte round
trips on one stream, stream opens per second (one exchange each; listener-opened
streams too), an AMP call on the control stream vs one stream per call, and round
trips on one stream while another carries a bulk transfer. The per-stream path is a
fresh verified TLS link per stream (what spare links hid; without the Hello and
OpenStream round trips it also needed, so the old path is flattered). ``--sweep``
times one stream's bulk transfer under several window and frame sizes.
"""

import argparse
import statistics
import subprocess
import sys
import time

from common import table
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


def serve(args):
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
    print(mux_port.getHost().port, plain_port.getHost().port, flush=True)
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


@defer.inlineCallbacks
def sink_stream(link, total):
    client = Client()
    yield link.open("sink", str(total), client)
    return client


PHASES = ("bulk", "rtt", "opens", "amp", "beside")


@defer.inlineCallbacks
def main(args, mux_port, plain_port):
    total, count, only = args.mib << 20, args.count, args.only
    link = yield connect_link(mux_port, args)
    rows = []

    if "bulk" in only:
        mux_bulk, plain_bulk = yield both_bulks(link, plain_port, total)
        rows.append((f"bulk {args.mib} MiB, one stream", f"{plain_bulk:.0f} MB/s", f"{mux_bulk:.0f} MB/s",
                     f"{mux_bulk / plain_bulk:.2f}x"))

    mux_rtt = None
    if "rtt" in only or "beside" in only:
        client = Client()
        yield link.open("echo", "", client)
        mux_rtt = summary((yield round_trips(client, count)))
        client.transport.loseConnection()
    if "rtt" in only:
        client = yield tls_connect(plain_port)
        client.transport.write(b"echo\n")
        plain_rtt = summary((yield round_trips(client, count)))
        client.transport.loseConnection()
        rows += [
            ("64-byte round trips on one stream, median", f"{plain_rtt[0]:.0f} µs", f"{mux_rtt[0]:.0f} µs",
             f"{plain_rtt[0] / mux_rtt[0]:.2f}x"),
            ("64-byte round trips on one stream, p99", f"{plain_rtt[1]:.0f} µs", f"{mux_rtt[1]:.0f} µs",
             f"{plain_rtt[1] / mux_rtt[1]:.2f}x"),
            ("64-byte round trips per second", f"{plain_rtt[2]:.0f}/s", f"{mux_rtt[2]:.0f}/s",
             f"{mux_rtt[2] / plain_rtt[2]:.2f}x")]

    if "opens" in only:
        mux_opens = yield timed(count, lambda: one_exchange(lambda p: link.open("echo", "", p)))

        @defer.inlineCallbacks
        def plain_open():
            client = yield tls_connect(plain_port)
            client.transport.write(b"echo\nx")
            yield client.wait(1)
            client.transport.loseConnection()

        plain_opens = yield timed(count, plain_open)
        reverse = Client()
        yield link.open("reverse", str(count), reverse)
        line = yield reverse.wait(2)
        while not line.endswith(b"\n"):
            line = yield reverse.wait(len(line) + 1)
        reverse_opens = count / float(line)
        rows += [
            ("streams opened per second (one exchange each)", f"{plain_opens:.0f}/s", f"{mux_opens:.0f}/s",
             f"{mux_opens / plain_opens:.2f}x"),
            ("... opened by the listener", "impossible", f"{reverse_opens:.0f}/s", "")]

    if rows:
        table(f"multiplexed link vs a TLS link per stream ({count} exchanges each; loopback, server in its own "
              "process)", ("measure", "link per stream", "one HTTP/2 link", "ratio"), rows)

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

    if "beside" in only:  # round trips beside a bulk transfer on the same link
        interactive = Client()
        yield link.open("echo", "", interactive)
        background = yield sink_stream(link, total)
        bulk_done = bulk(background, total)
        beside = []
        while not bulk_done.called:
            beside.extend((yield round_trips(interactive, 50)))
        rate = yield bulk_done
        during = summary(beside)
        table(f"64-byte round trips on one stream while another carries {args.mib} MiB", ("", "median", "p99"), [
            ("alone", f"{mux_rtt[0]:.0f} µs", f"{mux_rtt[1]:.0f} µs"),
            (f"beside the bulk stream ({len(beside)} round trips; bulk {rate:.0f} MB/s)", f"{during[0]:.0f} µs",
             f"{during[1]:.0f} µs")])


@defer.inlineCallbacks
def both_bulks(link, plain_port, total):
    """MB/s of one bulk transfer on a stream of ``link``, then on a TLS link of its own."""
    client = yield sink_stream(link, total)
    mux = yield bulk(client, total)
    client.transport.loseConnection()
    client = yield tls_connect(plain_port)
    client.transport.write(f"sink {total}\n".encode())
    plain = yield bulk(client, total)
    client.transport.loseConnection()
    return mux, plain


@defer.inlineCallbacks
def sweep_one(args, mux_port, plain_port):
    link = yield connect_link(mux_port, args)
    rates = yield both_bulks(link, plain_port, args.mib << 20)
    link.close("done")
    return rates


def start_server(args):
    argv = [sys.executable, __file__, "--serve", "--stream-window", str(args.stream_window), "--link-window",
            str(args.link_window), "--frame", str(args.frame)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    mux_port, plain_port = map(int, server.stdout.readline().split())
    return server, mux_port, plain_port


@defer.inlineCallbacks
def sweep(args):
    rows = []
    for window in args.windows:
        for frame in args.frames:
            args.stream_window, args.frame = window, frame
            args.link_window = max(window * 4, 32 << 20)
            server, mux_port, plain_port = start_server(args)
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
    parser.add_argument("--repeat", type=int, default=2, help="transfers per setting in --sweep (default 2)")
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
        server, mux_port, plain_port = start_server(args)
        d = main(args, mux_port, plain_port)
    d.addErrback(lambda f: (f.printTraceback(), failed.append(f)))
    d.addBoth(lambda _: reactor.stop())
    try:
        reactor.run()
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run())
