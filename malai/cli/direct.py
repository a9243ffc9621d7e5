"""``python -m malai.cli.direct HOME FD``: the daemon's part of one exec, when no daemon runs.

The ``malai`` command starts this with one end of a socket pair; it answers
``Exec``/``Machines`` on it exactly as the daemon's control socket would,
dialing the machine with the cluster's own identity, then exits.
"""

import sys
from pathlib import Path

from twisted.internet import reactor

from malai.control.server import ControlProtocol
from malai.home import Home
from malai.p2p.dial import AddressBook, Dialer
from malai.p2p.tls import PeerTLS
from malai.peer.protocol import HelloInfo
from malai.services.cluster import ClusterService


class DirectContext:
    """What ``ControlProtocol`` needs of the daemon, for one connection."""

    def __init__(self, home: Home):
        self.reactor = reactor
        self.hello = HelloInfo()
        self.tls = PeerTLS()
        self.book = AddressBook()
        self.dialer = Dialer(reactor, self.tls, self.book)
        self.clusters = {}
        for entry in home.scan():
            if entry.identity is not None and entry.role is not None:
                svc = ClusterService(entry)
                self.tls.add(svc.identity)
                for id52, hints in svc.addresses().items():
                    self.book.configure(id52, hints)
                self.clusters[entry.alias] = svc

    def cluster(self, alias: str) -> ClusterService:
        from malai.errors import MalaiError

        if alias not in self.clusters:
            raise MalaiError(f"no cluster {alias!r} here; clusters: {', '.join(self.clusters) or 'none'}")
        return self.clusters[alias]


class OneShot(ControlProtocol):
    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        if reactor.running:
            reactor.stop()


def main() -> None:
    import socket

    home, fd = Path(sys.argv[1]), int(sys.argv[2])
    context = DirectContext(Home(home))
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    from twisted.internet.protocol import Factory

    factory = Factory.forProtocol(lambda: OneShot(context))
    reactor.callWhenRunning(lambda: reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory))
    reactor.run()
    sock.close()


if __name__ == "__main__":
    main()
