"""``LinkPool``: one link per (local identity, remote ID52), shared by every operation."""

from typing import Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from malai.identity import Identity
from malai.p2p.dial import Dialer
from malai.peer.protocol import PeerAMP, PeerAMPFactory

__all__ = ["LinkPool"]

Key = Tuple[str, str]


class LinkPool:
    """Reuses open links, shares a dial in flight, and re-dials after a link closes.

    Links the peer dialed (``adopt``) are reused too, so a machine behind a
    firewall can be reached over the link it opened.
    """

    log = Logger()

    def __init__(self, dialer: Dialer, factory: PeerAMPFactory):
        self.dialer = dialer
        self.factory = factory
        self._links: Dict[Key, PeerAMP] = {}
        self._dialing: Dict[Key, List[Deferred]] = {}

    def get(self, local: Identity, peer: str, hints: Optional[List[str]] = None) -> Deferred:
        """Fire with a ready ``PeerAMP`` to ``peer``, dialing only when none is open."""
        key = (local.id52, peer)
        link = self._links.get(key)
        if link is not None:
            d: Deferred = Deferred()
            d.callback(link)
            return d
        waiter: Deferred = Deferred()
        if key in self._dialing:
            self._dialing[key].append(waiter)
            return waiter
        self._dialing[key] = [waiter]
        dial = self.dialer.connect(local, peer, self.factory, hints)
        dial.addCallback(lambda link: link.ready.addCallback(lambda _: link))
        dial.addCallbacks(self._dialed, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return waiter

    def _dialed(self, link: PeerAMP, key: Key) -> None:
        self.adopt(link)
        for waiter in self._dialing.pop(key, []):
            waiter.callback(link)

    def _failed(self, failure, key: Key) -> None:
        for waiter in self._dialing.pop(key, []):
            waiter.errback(failure)

    def adopt(self, link: PeerAMP) -> None:
        """Make ``link`` the one used for its (local, peer) pair."""
        key = (link.peer.local, link.peer.peer)
        self._links[key] = link
        link.closed.addCallback(self._closed, key)

    def _closed(self, link: PeerAMP, key: Key) -> None:
        if self._links.get(key) is link:
            del self._links[key]

    def links(self) -> List[PeerAMP]:
        return list(self._links.values())

    def close(self, local: Optional[str] = None) -> Deferred:
        """Close every link (of the ``local`` ID52 only, if given); fire when all are closed."""
        closing = [link for key, link in self._links.items() if local is None or key[0] == local]
        waits = [link.closed for link in closing]
        for link in closing:
            link.transport.loseConnection()
        return DeferredList(waits)
