"""The ``malai:`` client endpoint: any endpoint-taking code can dial an ID52.

``malai:<peer-id52>:key=<key file>:addrs=<host\\:port>,<host\\:port>``, or
``cluster=<alias>`` (with optional ``home=``) instead of ``key=`` to dial
with that cluster's identity. The protocol gets the pinned TLS stream, with a
``PeerAddress`` naming both verified ends.
"""

from pathlib import Path
from typing import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamClientEndpointStringParserWithReactor
from twisted.plugin import IPlugin
from zope.interface import implementer

from malai.errors import MalaiError
from malai.identity import Identity, parse_id52
from malai.p2p.dial import AddressBook, Dialer
from malai.p2p.tls import PeerTLS

__all__ = ["MalaiClientEndpoint", "MalaiEndpointParser"]


@implementer(IStreamClientEndpoint)
class MalaiClientEndpoint:
    def __init__(self, reactor, local: Identity, peer: str, hints: Sequence[str], timeout: float = 10.0):
        self.local = local
        self.peer = parse_id52(peer)
        self.hints = list(hints)
        self.dialer = Dialer(reactor, PeerTLS([local]), AddressBook(), timeout=timeout)

    def connect(self, factory) -> Deferred:
        return self.dialer.connect(self.local, self.peer, factory, self.hints)


def _identity(key: str = "", cluster: str = "", home: str = "") -> Identity:
    if key:
        return Identity.load(Path(key))
    if cluster:
        from malai.home import Home

        h = Home(Path(home)) if home else Home.default()
        folder = h.cluster_dir(cluster)
        for name in ("cluster.private-key", "machine.private-key"):
            if (folder / name).exists():
                return Identity.load(folder / name)
        raise MalaiError(f"malai: endpoint: no key for cluster {cluster!r} in {folder}")
    raise MalaiError("malai: endpoint needs key=<file> or cluster=<alias>")


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class MalaiEndpointParser:
    prefix = "malai"

    def parseStreamClient(self, reactor, peer, key="", cluster="", home="", addrs="", timeout="10"):
        hints = [a for a in addrs.split(",") if a]
        return MalaiClientEndpoint(reactor, _identity(key, cluster, home), peer, hints, float(timeout))
