"""Dialing by ID52: connection hints, an address book, and a Happy Eyeballs race.

A hint says one way to reach a peer (``tcp:HOST:PORT`` today; ``relay:`` and
``tor:`` plug in as more kinds). ``Dialer.connect`` starts the hints one after
another, ``stagger`` seconds apart, keeps the first verified link and cancels
the rest; a wrong key ends the race at once.
"""

from ipaddress import ip_address
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from malai.errors import MalaiError
from malai.identity import Identity
from malai.p2p.link import WrongPeer, connect_verified
from malai.p2p.onion import ONION_PORT, onion_address
from malai.p2p.tls import PeerTLS

__all__ = ["AddressBook", "DialError", "Dialer", "HINT_KINDS", "MAX_LEARNT", "advertised_hint", "hint_endpoint", "tcp_client",
           "hint_kind", "normalize_hint"]

#: Hints kept per peer, of each kind learnt at run time (that worked; that the peer advertised).
MAX_LEARNT = 8


class DialError(MalaiError):
    """No link could be made to a peer."""


#: Kinds of connection hint; other text before a colon is a host (``HOST:PORT``).
HINT_KINDS = ("tcp", "relay", "tor")


def normalize_hint(hint: str) -> str:
    """``HOST:PORT`` is short for ``tcp:HOST:PORT``."""
    return hint if hint.split(":", 1)[0] in HINT_KINDS else f"tcp:{hint}"


_PREFERENCE = {"tcp": 0, "relay": 1, "tor": 2}


def hint_kind(hint: str) -> str:
    return normalize_hint(hint).split(":", 1)[0]


def advertised_hint(listen: str, observed_host: str) -> str:
    """A hint to reach a peer back at an address it listens on (``HOST:PORT``).

    A wildcard host (``0.0.0.0``, ``::``) becomes the address the peer was seen from."""
    host, _, port = listen.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = f"[{observed_host}]" if ":" in observed_host else observed_host
    return normalize_hint(f"{host}:{port}")


def tcp_client(reactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A TCP client endpoint for ``host``: an IP address is connected to as it is (``HostnameEndpoint``
    would resolve it again in a thread, a few hundred microseconds per connection), a name resolved."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def hint_endpoint(reactor, hint: str, timeout: float) -> IStreamClientEndpoint:
    """The client endpoint a hint names."""
    kind, _, rest = normalize_hint(hint).partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not (port.isascii() and port.isdigit()):
        raise DialError(f"cannot use connection hint {hint!r}: expected tcp:HOST:PORT")
    return tcp_client(reactor, host.strip("[]"), int(port), timeout)


class AddressBook:
    """Known hints per ID52, tried in this order: hints that just worked, hints from config,
    hints the peer advertised in ``Hello``, hints LAN discovery found (``lan``)."""

    def __init__(self) -> None:
        self._configured: Dict[str, Tuple[str, ...]] = {}
        self._worked: Dict[str, List[str]] = {}
        self._advertised: Dict[str, List[str]] = {}
        #: ``id52 -> tcp hints`` announced on the LAN (malai.services.discovery), or None when off.
        self.lan: Optional[Callable[[str], List[str]]] = None

    def configure(self, id52: str, hints: Iterable[str]) -> None:
        self._configured[id52] = tuple(normalize_hint(h) for h in hints)

    def learn(self, id52: str, hint: str) -> None:
        """A hint a verified link to ``id52`` just came through: tried first (the last ``MAX_LEARNT``)."""
        hint = normalize_hint(hint)
        worked = self._worked.setdefault(id52, [])
        if hint in worked:
            worked.remove(hint)
        worked.insert(0, hint)
        del worked[MAX_LEARNT:]

    def advertise(self, id52: str, listens: Iterable[str], observed_host: str) -> List[str]:
        """Take where a peer says it listens (``HOST:PORT``, the wildcard host meaning the host its
        link came from), replacing what it said before; return the hints kept.

        Kept: hints configured for the peer, and ``tcp`` hints on ``observed_host`` (the host the
        link came from), at most ``MAX_LEARNT``; never another host, so a peer cannot make us
        dial anywhere else (a cloud metadata address, an internal service)."""
        configured = self._configured.get(id52, ())
        kept: List[str] = []
        for listen in listens:
            hint = advertised_hint(listen, observed_host)
            if hint not in kept and (hint in configured or _on_host(hint, observed_host)):
                kept.append(hint)
                if len(kept) == MAX_LEARNT:
                    break
        self._advertised[id52] = kept
        return kept

    def hints(self, id52: str) -> List[str]:
        out: List[str] = []
        lan = self.lan(id52) if self.lan is not None else ()
        for hint in (*self._worked.get(id52, ()), *self._configured.get(id52, ()), *self._advertised.get(id52, ()),
                     *lan):
            if hint not in out:
                out.append(hint)
        return out


def _on_host(hint: str, host: str) -> bool:
    """Whether ``hint`` is ``tcp:HOST:PORT`` with a valid port on ``host`` (an IP address)."""
    kind, _, rest = hint.partition(":")
    hint_host, _, port = rest.rpartition(":")
    if kind != "tcp" or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return False
    try:
        return _ip(hint_host.strip("[]")) == _ip(host)
    except ValueError:
        return False


def _ip(text: str):
    address = ip_address(text)
    return getattr(address, "ipv4_mapped", None) or address  # ::ffff:192.0.2.5 is 192.0.2.5


class Dialer:
    """Connects a local identity to a remote ID52."""

    def __init__(self, reactor, tls: PeerTLS, book: AddressBook, stagger: float = 0.25, timeout: float = 10.0,
                 endpoint_for=hint_endpoint, fallback_delay: float = 1.0):
        self.reactor = reactor
        self.endpoint_for = endpoint_for
        #: How to reach a peer through a hint of another kind: ``kind -> f(local, peer, hint) -> endpoint``
        #: (the peer layer adds ``relay``).
        self.kinds: Dict[str, Callable[[Identity, str, str], IStreamClientEndpoint]] = {}
        self.tls = tls
        self.book = book
        self.stagger = stagger
        self.fallback_delay = fallback_delay  # before a relay or Tor hint, unless direct ones failed already
        self.timeout = timeout

    def endpoint(self, local: Identity, peer: str, hint: str) -> IStreamClientEndpoint:
        kind = hint_kind(hint)
        if kind in self.kinds:
            return self.kinds[kind](local, peer, hint)
        if kind != "tcp":
            raise DialError(f"this daemon cannot use {kind} hints")
        return self.endpoint_for(self.reactor, hint, self.timeout)

    def direct_hints(self, peer: str) -> List[str]:
        """The hints for ``peer`` that reach it without a relay."""
        return [h for h in self.book.hints(peer) if hint_kind(h) != "relay"]

    def connect(self, local: Identity, peer: str, factory: Factory, hints: Optional[Iterable[str]] = None) -> Deferred:
        """Fire with ``factory``'s protocol on a verified link to ``peer``."""
        hints = list(hints) if hints is not None else self.book.hints(peer)
        if not hints and "tor" not in self.kinds:
            lan = "" if self.book.lan is not None else "; LAN discovery is off"
            return _fail(DialError(f"no known address for {peer}: no address in the config, none learnt, none "
                                   f"announced on the LAN{lan}; add addrs to the config, pass --addr, or set up "
                                   "[tor] or a relay"))
        hints = [normalize_hint(h) for h in hints]
        if "tor" in self.kinds and not any(hint_kind(h) == "tor" for h in hints):
            hints.append(f"tor:{onion_address(peer)}:{ONION_PORT}")  # every identity is an onion service
        hints.sort(key=lambda h: _PREFERENCE.get(hint_kind(h), 0))  # direct first, then a relay, then Tor
        race = _Race(self, local, peer, factory, hints)
        return race.start()


def _fail(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(Failure(error))
    return d


class _Race:
    """One Happy Eyeballs dial: attempts started ``stagger`` apart, first success wins."""

    def __init__(self, dialer: Dialer, local: Identity, peer: str, factory: Factory, hints: List[str]):
        self.dialer, self.local, self.peer, self.factory = dialer, local, peer, factory
        self.pending = list(hints)
        self.attempts: Dict[str, Deferred] = {}
        self.errors: Dict[str, str] = {}
        self.result: Deferred = Deferred(lambda d: self._stop())
        self.next_call = None
        self.deadline = None

    def start(self) -> Deferred:
        self.deadline = self.dialer.reactor.callLater(self.dialer.timeout, self._timed_out)
        self._launch()
        return self.result

    def _launch(self) -> None:
        self.next_call = None
        if self.result.called:
            return
        if not self.pending:
            if not self.attempts:
                self._give_up()
            return
        hint = self.pending.pop(0)
        try:
            endpoint = self.dialer.endpoint(self.local, self.peer, hint)
        except DialError as e:
            self.errors[hint] = str(e)
            self._launch()
            return
        d = connect_verified(self.dialer.tls, self.local, self.peer, endpoint, self.factory, hint)
        self.attempts[hint] = d
        d.addCallbacks(self._won, self._lost, callbackArgs=(hint,), errbackArgs=(hint,))
        if self.pending:
            direct = hint_kind(self.pending[0]) == "tcp"
            delay = self.dialer.stagger if direct else self.dialer.fallback_delay
            self.next_call = self.dialer.reactor.callLater(delay, self._launch)

    def _won(self, protocol, hint: str) -> None:
        del self.attempts[hint]
        if self.result.called:
            protocol.transport.loseConnection()
            return
        self.dialer.book.learn(self.peer, hint)
        self.result.callback(protocol)
        self._stop()

    def _lost(self, failure: Failure, hint: str) -> None:
        self.attempts.pop(hint, None)
        if failure.check(CancelledError, ConnectingCancelledError) or self.result.called:
            return
        self.errors[hint] = _reason(failure)
        if failure.check(WrongPeer):
            self._stop()
            self.result.errback(failure)
            return
        if self.next_call is not None:
            self.next_call.cancel()
        self._launch()

    def _timed_out(self) -> None:
        self.deadline = None
        for hint in self.attempts:
            self.errors[hint] = f"no answer within {self.dialer.timeout:g}s"
        self._give_up()

    def _give_up(self) -> None:
        if self.result.called:
            return
        self._stop()
        tried = "; ".join(f"{h}: {e}" for h, e in self.errors.items())
        self.result.errback(Failure(DialError(f"cannot reach {self.peer}: tried {tried}")))

    def _stop(self) -> None:
        for call in (self.next_call, self.deadline):
            if call is not None and call.active():
                call.cancel()
        self.next_call = self.deadline = None
        attempts, self.attempts = self.attempts, {}
        for d in attempts.values():
            d.cancel()


def _reason(failure: Failure) -> str:
    if isinstance(failure.value, MalaiError):
        return str(failure.value)
    text = failure.getErrorMessage()
    return text.split(": ", 1)[-1] if "Connection was refused" in text else text


