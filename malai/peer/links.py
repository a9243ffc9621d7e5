"""``LinkPool``: one multiplexed link (``malai.peer.mux``) per (local identity, peer ID52),
whichever side dialed it, shared by AMP commands and every byte stream.

A link is *ready* once its control stream is open and both sides said ``Hello``
(``PeerAMP.ready``). ``get`` hands out the ready link of a pair, sharing a dial
in flight; ``adopt`` takes links the peer dialed, so a machine behind NAT is
reached over the link it keeps. When a pair has two links (both sides dialed
at once, or two processes of one identity each dialed), both sides use the
one dialed by the side with the smaller ID52, so they settle on the same link
without a message; the other is left to whoever holds it and closes once idle
(``PeerAMP``'s idle timeout: no command and no stream).
"""

from typing import Dict, List, Mapping, Optional, Tuple, cast

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from malai.identity import Identity
from malai.p2p.dial import Dialer
from malai.peer.mux import MuxLink, MuxLinkFactory, MuxSettings, Responder
from malai.peer.protocol import PeerAMP, PeerAMPFactory
from malai.peer.streams import StreamRefused

__all__ = ["LinkPool", "dial_ready", "hello_of", "link_factory", "when_ready"]

Key = Tuple[str, str]


def link_factory(commands: PeerAMPFactory, streams: Optional[Responder] = None, settings: MuxSettings = MuxSettings(),
                 clock=None) -> MuxLinkFactory:
    """Links of one side (``commands.dialer``): AMP by ``commands`` on the control stream,
    the peer's streams answered by ``streams`` (none taken without it)."""
    return MuxLinkFactory(commands.dialer, streams, commands.buildProtocol, settings, clock)


def dial_ready(dialer: Dialer, local: Identity, peer: str, factory: MuxLinkFactory,
               hints: Optional[List[str]] = None) -> Deferred:
    """Dial ``peer`` and fire with the link once both sides said ``Hello``."""
    d = dialer.connect(local, peer, factory, hints)
    d.addCallback(when_ready)
    return d


def when_ready(link: MuxLink) -> Deferred:
    """Fire with ``link`` once its control stream is open and the Hellos are exchanged."""
    def hello(_) -> Deferred:
        return cast(PeerAMP, link.control).ready

    return link.ready.addCallback(hello).addCallback(lambda _: link)


def hello_of(link: MuxLink) -> dict:
    """What the peer said in its ``Hello`` (its version, where it listens)."""
    return link.control.peer_hello if link.control is not None else {}


def _usable(link: Optional[MuxLink]) -> bool:
    return link is not None and link.accepting and link.control is not None \
        and link.control.peer_hello is not None


class LinkPool:
    """Reuses the open link of a pair, shares a dial in flight, re-dials after a link closed."""

    log = Logger()

    def __init__(self, dialer: Dialer, factory: MuxLinkFactory):
        self.dialer = dialer
        self.factory = factory
        self._links: Dict[Key, MuxLink] = {}  # the link used, per pair
        self._others: Dict[Key, List[MuxLink]] = {}  # other ready links of a pair, to promote if it closes
        self._dialing: Dict[Key, List[Deferred]] = {}

    def get(self, local: Identity, peer: str, hints: Optional[List[str]] = None) -> Deferred:
        """Fire with the ready link to ``peer``, dialing only when none is open."""
        key = (local.id52, peer)
        link = self._links.get(key)
        if _usable(link):
            return succeed(link)
        waiter: Deferred = Deferred()
        if key in self._dialing:
            self._dialing[key].append(waiter)
            return waiter
        self._dialing[key] = [waiter]
        dial = dial_ready(self.dialer, local, peer, self.factory, hints)
        dial.addCallbacks(self._dialed, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return waiter

    def _dialed(self, link: MuxLink, key: Key) -> None:
        kept = self.adopt(link)
        for waiter in self._dialing.pop(key, []):
            waiter.callback(kept)

    def _failed(self, failure, key: Key) -> None:
        for waiter in self._dialing.pop(key, []):
            waiter.errback(failure)

    def adopt(self, link: MuxLink) -> MuxLink:
        """Make ``link`` (ready) the one of its pair, unless the pair has a link that wins
        over it. Returns the link used from now on."""
        key = (link.peer.local, link.peer.peer)
        current = self._links.get(key)
        if current is link or link in self._others.get(key, ()):
            return current
        link.closed.addCallback(self._closed, key)
        if _usable(current) and _wins(current, link):
            self._others.setdefault(key, []).append(link)
            return current
        if current is not None:
            self._others.setdefault(key, []).append(current)
        self._links[key] = link
        return link

    def _closed(self, link: MuxLink, key: Key) -> MuxLink:
        others = self._others.get(key, [])
        if link in others:
            others.remove(link)
        if self._links.get(key) is link:
            del self._links[key]
            usable = [other for other in others if _usable(other)]
            if usable:  # the best of the others takes over
                best = usable[0]
                for other in usable[1:]:
                    best = best if _wins(best, other) else other
                others.remove(best)
                self._links[key] = best
        if not others:
            self._others.pop(key, None)
        return link  # for the observers after us (a keeper)

    def current(self, local: str, peer: str) -> Optional[MuxLink]:
        """The ready link between ``local`` and ``peer``, without dialing."""
        link = self._links.get((local, peer))
        return link if _usable(link) else None

    def links(self) -> List[MuxLink]:
        return list(self._links.values())

    def open(self, local: Identity, peer: str, kind: str, target: str, protocol: Protocol,
             headers: Mapping[str, str] = {}) -> Deferred:
        """Open a ``kind`` stream to ``target`` on the link to ``peer`` (dialing it if needed);
        fire with ``protocol`` once the peer accepted it, or fail with ``StreamRefused``
        (or the dial's error). A link found draining is left for a new one, once."""
        def opened(link: MuxLink) -> Deferred:
            return link.open(kind, target, protocol, headers)

        def retry(failure):
            failure.trap(StreamRefused)
            if failure.value.code != "DRAINING":
                return failure
            return self.get(local, peer).addCallback(opened)

        return self.get(local, peer).addCallback(opened).addErrback(retry)

    def close(self, local: Optional[str] = None) -> Deferred:
        """Close every link (of the ``local`` ID52 only, if given); fire when all are closed."""
        closing = [link for key, link in self._links.items() if local is None or key[0] == local]
        for link in closing:
            link.close("closed by this side")
        return DeferredList([link.closed for link in closing])

    def drain(self, timeout: float) -> Deferred:
        """Let every link's open streams finish for up to ``timeout`` seconds, then close them."""
        return DeferredList([link.drain(timeout) for link in list(self._links.values())])


def _wins(a: MuxLink, b: MuxLink) -> bool:
    """Whether ``a`` is kept over ``b`` (two links of one pair): the one dialed by the side
    with the smaller ID52, as both sides decide alike; between two such, the older."""
    def dialed_by_smaller(link: MuxLink) -> bool:
        dialer_id52 = link.peer.local if link.dialer else link.peer.peer
        return dialer_id52 == min(link.peer.local, link.peer.peer)

    return dialed_by_smaller(a) or not dialed_by_smaller(b)

