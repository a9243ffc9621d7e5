"""``python -m malai.cli.direct HOME FD``: the daemon's part of one exec, when no daemon runs.

The ``malai`` command starts this with one end of a socket pair; it answers
``Exec``/``Machines`` on it exactly as the daemon's control socket would,
dialing the machine with the cluster's own identity, then exits.
"""

import sys
from pathlib import Path
from typing import Optional

from twisted.internet.defer import Deferred

from malai.control.server import ControlProtocol
from malai.home import Home
from malai.p2p.dial import AddressBook, Dialer
from malai.p2p.tls import PeerTLS
from malai.peer.links import LinkPool, link_factory
from malai.peer.protocol import HelloInfo, PeerAMPFactory
from malai.peer.relaying import relay_endpoint
from malai.services.cluster import ClusterService


class DirectContext:
    """What the daemon offers its commands (clusters, dialer, a link pool), for a
    command that runs without one: the clusters' own identities, dialing directly."""

    def __init__(self, home: Home, reactor, only: Optional[str] = None):
        self.reactor = reactor
        self.hello = HelloInfo()
        self.tls = PeerTLS()
        self.book = AddressBook()
        self.dialer = Dialer(reactor, self.tls, self.book)
        # streams go one way: this process answers none the machine opens
        self.pool = LinkPool(self.dialer, link_factory(PeerAMPFactory(self.hello, dialer=True), clock=reactor))
        self.dialer.kinds["relay"] = relay_endpoint(
            lambda local, relay: self.pool.get(local, relay, self.dialer.direct_hints(relay)))
        self.clusters = {}
        self.problems = {}
        for entry in home.scan(only):
            self.problems[entry.alias] = entry.problems
            if entry.identity is not None and entry.role is not None:
                svc = ClusterService(entry)
                self.tls.add(svc.identity)
                for id52, hints in svc.addresses().items():
                    self.book.configure(id52, hints)
                self.clusters[entry.alias] = svc

    def cluster(self, alias: str) -> ClusterService:
        from malai.errors import MalaiError

        if alias not in self.clusters and self.problems.get(alias):
            raise MalaiError("\n".join(self.problems[alias]))
        if alias not in self.clusters:
            raise MalaiError(f"no cluster {alias!r} here; clusters: {', '.join(self.clusters) or 'none'}")
        return self.clusters[alias]

    def close(self) -> Deferred:
        return self.pool.close()


class OneShot(ControlProtocol):
    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        if self.root.reactor.running:
            self.root.reactor.stop()


def main() -> None:
    import socket

    from twisted.internet import reactor

    home, fd = Path(sys.argv[1]), int(sys.argv[2])
    context = DirectContext(Home(home), reactor)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    from twisted.internet.protocol import Factory

    factory = Factory.forProtocol(lambda: OneShot(context))
    reactor.callWhenRunning(lambda: reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory))
    reactor.run()
    sock.close()


if __name__ == "__main__":
    main()
