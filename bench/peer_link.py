"""Peer link benchmark: handshake latency and bulk throughput, malai link vs plain TCP.

    python bench/peer_link.py [--gib 1] [--handshakes 200]

The server runs in a child process (so each side has its own core); both
paths are measured in the same run and the ratios printed.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from malai.identity import Identity
from malai.p2p.link import connect_verified, server_factory
from malai.p2p.tls import PeerTLS

CHUNK = 64 * 1024
SERVER_KEY = "11" * 32
CLIENT_KEY = "22" * 32


class Sink(protocol.Protocol):
    """Greets (so the client knows it was accepted), counts bytes, answers 'done' at the expected size."""

    def connectionMade(self):
        self.expected = None
        self.received = 0
        self.buffer = b""
        self.transport.write(b"k")

    def dataReceived(self, data):
        if self.expected is None:
            self.buffer += data
            if b"\n" not in self.buffer:
                return
            header, _, data = self.buffer.partition(b"\n")
            self.expected = int(header)
        self.received += len(data)
        if self.received >= self.expected:
            self.transport.write(b"done")


def serve():
    server = Identity.from_hex(SERVER_KEY)
    tls = PeerTLS([server])
    factory = protocol.Factory.forProtocol(Sink)
    tls_port = reactor.listenTCP(0, server_factory(tls, lambda addr: factory.buildProtocol(addr)),
                                 interface="127.0.0.1")
    tcp_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(tcp_port.getHost().port, tls_port.getHost().port, flush=True)
    reactor.run()


@implementer(IPullProducer)
class Bulk:
    def __init__(self, transport, total):
        self.transport, self.left = transport, total
        self.chunk = os.urandom(CHUNK)

    def resumeProducing(self):
        if self.left <= 0:
            self.transport.unregisterProducer()
            return
        self.transport.write(self.chunk)
        self.left -= CHUNK

    def stopProducing(self):
        self.left = 0


class Client(protocol.Protocol):
    def __init__(self):
        self.greeted = defer.Deferred()
        self.finished = defer.Deferred()
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        if not self.greeted.called and self.buffer.startswith(b"k"):
            self.greeted.callback(self)
        if self.buffer.endswith(b"done"):
            self.finished.callback(self)


class ClientFactory(protocol.Factory):
    def buildProtocol(self, addr):
        return Client()


CLIENT = Identity.from_hex(CLIENT_KEY)
CLIENT_TLS = PeerTLS([CLIENT])  # as in the daemon: one context per identity, made once


def tls_connect(port):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return connect_verified(CLIENT_TLS, CLIENT, Identity.from_hex(SERVER_KEY).id52, endpoint, ClientFactory())


def tcp_connect(port):
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())


@defer.inlineCallbacks
def handshakes(connect, port, n):
    times = []
    for i in range(n + 5):
        start = time.perf_counter()
        client = yield connect(port)
        yield client.greeted
        if i >= 5:
            times.append(time.perf_counter() - start)
        client.transport.loseConnection()
    return statistics.median(times) * 1000, sorted(times)[int(len(times) * 0.9)] * 1000


@defer.inlineCallbacks
def bulk(connect, port, total):
    start = time.perf_counter()
    client = yield connect(port)
    yield client.greeted
    client.transport.write(f"{total}\n".encode())
    client.transport.registerProducer(Bulk(client.transport, total), False)
    yield client.finished
    elapsed = time.perf_counter() - start
    client.transport.loseConnection()
    return total / elapsed / 1e6


@defer.inlineCallbacks
def main(args, tcp_port, tls_port):
    rows = []
    n = args.handshakes
    tcp_hs = yield handshakes(tcp_connect, tcp_port, n)
    tls_hs = yield handshakes(tls_connect, tls_port, n)
    total = int(args.gib * (1 << 30))
    tcp_bw = yield bulk(tcp_connect, tcp_port, total)
    tls_bw = yield bulk(tls_connect, tls_port, total)
    rows.append(("connect until the server's first byte, median", f"{tcp_hs[0]:.2f} ms", f"{tls_hs[0]:.2f} ms",
                 f"{tls_hs[0] / tcp_hs[0]:.1f}x"))
    rows.append(("connect until the server's first byte, p90", f"{tcp_hs[1]:.2f} ms", f"{tls_hs[1]:.2f} ms",
                 f"{tls_hs[1] / tcp_hs[1]:.1f}x"))
    rows.append((f"bulk {args.gib:g} GiB, client to server", f"{tcp_bw:.0f} MB/s", f"{tls_bw:.0f} MB/s",
                 f"{tls_bw / tcp_bw:.2f}x"))
    print(f"\npeer link benchmark ({n} handshakes, {args.gib:g} GiB; loopback, server in its own process)\n")
    print(f"| {'measure':<46} | {'plain TCP':>10} | {'malai link':>10} | {'ratio':>6} |")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")
    for row in rows:
        print(f"| {row[0]:<46} | {row[1]:>10} | {row[2]:>10} | {row[3]:>6} |")


def run():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="bulk transfer size in GiB (default 1)")
    parser.add_argument("--handshakes", type=int, default=200, help="handshakes to time (default 200)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        tcp_port, tls_port = map(int, server.stdout.readline().split())
        d = main(args, tcp_port, tls_port)
        d.addErrback(lambda f: (f.printTraceback(), setattr(run, "failed", True)))
        d.addBoth(lambda _: reactor.stop())
        reactor.run()
    finally:
        server.terminate()
        server.wait()
    return 1 if getattr(run, "failed", False) else 0


if __name__ == "__main__":
    sys.exit(run())
