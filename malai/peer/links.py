"""``LinkPool``: one link per (local identity, remote ID52), shared by request/response
traffic; ``SpareLinks``: links made ready ahead for byte streams, one stream each."""

from typing import Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, succeed
from twisted.internet.defer import TimeoutError as WaitTimedOut
from twisted.logger import Logger

from malai.identity import Identity
from malai.p2p.dial import Dialer, DialError
from malai.peer.protocol import PeerAMP, PeerAMPFactory

__all__ = ["MAX_DIALS_PER_PEER", "LinkPool", "SpareLinks", "dial_ready"]

Key = Tuple[str, str]

#: Stream links dialed to one peer at a time; more wait their turn, so a burst of streams
#: stays under the peer's cap on handshakes in progress per source address.
MAX_DIALS_PER_PEER = 32


def dial_ready(dialer: Dialer, local: Identity, peer: str, factory: PeerAMPFactory,
               hints: Optional[List[str]] = None) -> Deferred:
    """Dial ``peer`` and fire with the link once both sides said ``Hello``."""
    d = dialer.connect(local, peer, factory, hints)
    d.addCallback(lambda link: link.ready.addCallback(lambda _: link))
    return d


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
        if link is not None and link.innerProtocol is None:
            d: Deferred = Deferred()
            d.callback(link)
            return d
        waiter: Deferred = Deferred()
        if key in self._dialing:
            self._dialing[key].append(waiter)
            return waiter
        self._dialing[key] = [waiter]
        dial = dial_ready(self.dialer, local, peer, self.factory, hints)
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
        """Make ``link`` the one used for its (local, peer) pair, unless one is open
        (a peer may open several: the others will carry byte streams)."""
        key = (link.peer.local, link.peer.peer)
        current = self._links.get(key)
        if current is not None and current.innerProtocol is None:
            return
        self._links[key] = link
        link.closed.addCallback(self._closed, key)

    def _closed(self, link: PeerAMP, key: Key) -> PeerAMP:
        if self._links.get(key) is link:
            del self._links[key]
        return link  # for the observers after us (a keeper)

    def current(self, local: str, peer: str) -> Optional[PeerAMP]:
        """The open link between ``local`` and ``peer``, without dialing."""
        link = self._links.get((local, peer))
        return link if link is not None and link.innerProtocol is None else None

    def links(self) -> List[PeerAMP]:
        return list(self._links.values())

    def close(self, local: Optional[str] = None) -> Deferred:
        """Close every link (of the ``local`` ID52 only, if given); fire when all are closed."""
        closing = [link for key, link in self._links.items() if local is None or key[0] == local]
        waits = [link.closed for link in closing]
        for link in closing:
            link.transport.loseConnection()
        return DeferredList(waits)


class SpareLinks:
    """Ready links kept aside for byte streams (forwarded connections, exec).

    A stream needs a link of its own; dialing one costs a TCP connect, a TLS
    handshake and a Hello. ``take`` hands out a spare when there is one and
    dials ``spares`` new ones behind it, so a burst of streams to the same
    peer finds links ready. Only pairs that carried a stream get spares; an
    unused spare closes after the factory's idle timeout.
    """

    def __init__(self, dialer: Dialer, factory: PeerAMPFactory, spares: int = 2):
        self.dialer = dialer
        self.factory = factory
        self.spares = spares
        self._ready: Dict[Key, List[PeerAMP]] = {}
        self._dialing: Dict[Key, int] = {}
        self._turns: Dict[Key, DeferredSemaphore] = {}

    def take(self, local: Identity, peer: str) -> Deferred:
        """Fire with a ready link to ``peer`` that belongs to the caller alone."""
        ready = self._ready.get((local.id52, peer), [])
        taken = succeed(ready.pop(0)) if ready else self._dial(local, peer)
        self._refill(local, peer)
        return taken

    def _dial(self, local: Identity, peer: str) -> Deferred:
        """``dial_ready`` once fewer than ``MAX_DIALS_PER_PEER`` dials to ``peer`` are in progress,
        within the dialer's timeout."""
        turns = self._turns.setdefault((local.id52, peer), DeferredSemaphore(MAX_DIALS_PER_PEER))
        timeout = self.dialer.timeout

        def dial(_) -> Deferred:
            def release(result):
                turns.release()
                return result

            return dial_ready(self.dialer, local, peer, self.factory).addBoth(release)

        def waited(failure):
            failure.trap(WaitTimedOut)
            raise DialError(f"cannot reach {peer}: {MAX_DIALS_PER_PEER} links to it were still being dialed "
                            f"after {timeout:g}s")

        return turns.acquire().addTimeout(timeout, self.dialer.reactor).addCallbacks(dial, waited)

    def _refill(self, local: Identity, peer: str) -> None:
        key = (local.id52, peer)
        missing = self.spares - len(self._ready.get(key, [])) - self._dialing.get(key, 0)
        for _ in range(missing):
            self._dialing[key] = self._dialing.get(key, 0) + 1
            d = self._dial(local, peer)
            d.addCallbacks(self._spare, self._spare_failed, callbackArgs=(key,), errbackArgs=(key,))

    def _spare(self, link: PeerAMP, key: Key) -> None:
        self._dialing[key] -= 1
        self._ready.setdefault(key, []).append(link)
        link.closed.addCallback(self._discard, key)

    def _spare_failed(self, failure, key: Key) -> None:
        self._dialing[key] -= 1  # the next take dials in the open and reports the error

    def _discard(self, link: PeerAMP, key: Key) -> PeerAMP:
        ready = self._ready.get(key, [])
        if link in ready:
            ready.remove(link)
        return link

    def links(self) -> List[PeerAMP]:
        return [link for links in self._ready.values() for link in links]

    def close(self, local: Optional[str] = None) -> Deferred:
        """Close the spares (of the ``local`` ID52 only, if given)."""
        closing = [link for key, links in self._ready.items() if local is None or key[0] == local
                   for link in links]
        for link in closing:
            link.transport.loseConnection()
        return DeferredList([link.closed for link in closing])
