"""A SOCKS5 proxy (RFC 1928) whose names are malai names.

CONNECT with no authentication, nothing else. ``<service>.<machine>.<cluster>``
(any port) is that machine's TCP service, opened with ``open_stream`` as a
forward opens it, so the machine's ACL decides; ``<anything>.localhost`` goes
to an HTTP front, which routes by ``Host``. IP addresses and other names are
refused: a client must send names (``socks5h://``, ``curl --socks5-hostname``).

A client has ``GREETING_TIMEOUT`` seconds to finish its greeting and request;
their lengths are bounded by the protocol (at most 257 and 262 bytes), and
nothing more is read until the request is answered.
"""

import ipaddress
import struct
from typing import Callable, Optional, Set, Tuple

import attrs
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from malai.config.device import check_remote
from malai.errors import MalaiError
from malai.peer.relay import Relay
from malai.peer.splice import Splice, SwitchTo
from malai.services.forwarding import ServiceAddress, StreamDenied, listen_endpoint, open_stream
from malai.services.listening import ListeningService

__all__ = ["Request", "SocksError", "SocksProxy", "SocksServer", "read_greeting", "read_request", "reply"]

GREETING_TIMEOUT = 10.0
VERSION = 5
NO_AUTH, NO_ACCEPTABLE = 0x00, 0xFF
CONNECT, BIND, UDP_ASSOCIATE = 1, 2, 3
IPV4, NAME, IPV6 = 1, 3, 4
# replies
SUCCEEDED, FAILURE, NOT_ALLOWED, HOST_UNREACHABLE = 0x00, 0x01, 0x02, 0x04
COMMAND_NOT_SUPPORTED, ADDRESS_NOT_SUPPORTED = 0x07, 0x08

NAMES = "<service>.<machine>.<cluster> or <service>.<cluster>.localhost"


class SocksError(Exception):
    """A greeting or request that cannot be served: ``reply`` is the code to answer
    with (None: not SOCKS5, close without an answer); the message says why."""

    def __init__(self, reply_code: Optional[int], why: str):
        super().__init__(why)
        self.reply = reply_code


@attrs.frozen
class Request:
    command: int
    kind: int  # IPV4, NAME or IPV6
    host: str
    port: int


def read_greeting(data: bytes) -> Optional[Tuple[bytes, int]]:
    """(the methods offered, bytes used), or None until the greeting is whole."""
    if not data:
        return None
    if data[0] != VERSION:
        what = "SOCKS4" if data[0] == 4 else f"version byte {data[0]}"
        raise SocksError(None, f"not a SOCKS5 client ({what}); only SOCKS5 is served")
    if len(data) < 2 or len(data) < 2 + data[1]:
        return None
    return bytes(data[2:2 + data[1]]), 2 + data[1]


def read_request(data: bytes) -> Optional[Tuple[Request, int]]:
    """(the request, bytes used), or None until it is whole."""
    if len(data) < 5:
        return None
    version, command, _, kind = data[:4]
    if version != VERSION:
        raise SocksError(FAILURE, f"a request with version byte {version}")
    if kind == IPV4:
        start, size = 4, 4
    elif kind == IPV6:
        start, size = 4, 16
    elif kind == NAME:
        start, size = 5, data[4]
    else:
        raise SocksError(ADDRESS_NOT_SUPPORTED, f"address type {kind}")
    end = start + size + 2
    if len(data) < end:
        return None
    raw = bytes(data[start:start + size])
    (port,) = struct.unpack(">H", data[end - 2:end])
    if kind == NAME:
        if not raw or not raw.isascii() or not raw.decode().isprintable():
            raise SocksError(HOST_UNREACHABLE, f"a name that is not printable ASCII: {raw[:64]!r}")
        host = raw.decode()
    else:
        host = str(ipaddress.ip_address(raw))
    if command != CONNECT:
        what = {BIND: "BIND", UDP_ASSOCIATE: "UDP ASSOCIATE"}.get(command, f"command {command}")
        raise SocksError(COMMAND_NOT_SUPPORTED, f"{what} for {host}:{port}; only CONNECT is served")
    return Request(command, kind, host, port), end


def reply(code: int) -> bytes:
    """A reply; the bound address is not told (0.0.0.0:0)."""
    return bytes([VERSION, code, 0, IPV4, 0, 0, 0, 0, 0, 0])


@implementer(IHalfCloseableProtocol)
class SocksServer(Protocol):
    """One client: its greeting and request, then the connection goes to ``inner``
    (the plain end of a relay, or a splice to the HTTP front) via ``route``. Every refusal
    is logged with why."""

    log = Logger()

    def __init__(self, route: Callable[["SocksServer", Request], None], clock, timeout: float = GREETING_TIMEOUT,
                 client: str = "a client"):
        self.route = route
        self.client = client
        self.clock = clock
        self.timeout = timeout
        self.buffer = b""
        self.greeted = False
        self.inner: Optional[Protocol] = None
        self.deadline = None
        self.request: Optional[Request] = None

    def connectionMade(self) -> None:
        self.deadline = self.clock.callLater(self.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self.request is not None or self.transport.disconnecting:
            return  # answered: nothing more is read
        self.buffer += data
        try:
            if not self.greeted:
                greeting = read_greeting(self.buffer)
                if greeting is None:
                    return
                methods, used = greeting
                self.buffer = self.buffer[used:]
                if NO_AUTH not in methods:
                    self.transport.write(bytes([VERSION, NO_ACCEPTABLE]))
                    self._close("the client offers no method malai serves (only 'no authentication')")
                    return
                self.greeted = True
                self.transport.write(bytes([VERSION, NO_AUTH]))
            parsed = read_request(self.buffer)
        except SocksError as e:
            self.refuse(e.reply, str(e))
            return
        if parsed is None:
            return
        self.request, used = parsed
        rest, self.buffer = self.buffer[used:], b""
        self._stop_deadline()
        self.route(self, self.request)
        if rest and self.inner is not None:
            self.inner.dataReceived(rest)  # sent before the answer: it waits with the relay

    def hand_to(self, inner: Protocol) -> None:
        """From now on the connection is ``inner``'s (which answers with ``succeeded``)."""
        self.inner = inner
        inner.makeConnection(self.transport)

    def succeeded(self) -> None:
        if self.connected:
            self.transport.write(reply(SUCCEEDED))

    def refuse(self, code: Optional[int], why: str) -> None:
        """Answer with ``code`` (None: no answer) and close; ``why`` goes to the log."""
        if code is not None and self.connected:
            self.transport.write(reply(code))
        self._close(why)

    def _close(self, why: str) -> None:
        (self.log.warn if self.buffer or self.greeted else self.log.info)("{client}: {why}",
                                                                          client=self.client, why=why)
        self._stop_deadline()
        self.transport.loseConnection()

    def _timed_out(self) -> None:
        self.refuse(FAILURE if self.greeted else None,
                    f"no complete SOCKS5 request within {self.timeout:g} s")

    def _stop_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()

    def readConnectionLost(self) -> None:
        if self.inner is None:
            self.transport.loseConnection()
        elif IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.readConnectionLost()
        else:
            self.inner.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.connected = False
        self._stop_deadline()
        if self.inner is not None:
            self.inner.connectionLost(reason)


class _SocksRelay(Relay):
    """A relay whose client hears SOCKS5's success when the stream opens, before any byte of it."""

    def link_connected(self) -> None:
        if self.plain.connected:
            self.plain.transport.write(reply(SUCCEEDED))
        super().link_connected()


@implementer(IHalfCloseableProtocol)
class _ToFront(Splice):
    """The client's end of a splice to the HTTP front: its EOF half-closes the front's side."""

    def readConnectionLost(self) -> None:
        other = self.other.transport if self.other is not None else None
        if other is not None and other.connected:
            other.loseWriteConnection()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class _Quiet(SwitchTo):
    noisy = False


class _SocksFactory(Factory):
    log = Logger()
    noisy = False
    timeout = GREETING_TIMEOUT

    def __init__(self, context, front: Optional[Tuple[str, int]]):
        self.context = context
        self.front = front
        self.active: Set[Relay] = set()
        self.total = 0

    def buildProtocol(self, addr) -> SocksServer:
        return SocksServer(self.route, self.context.reactor, self.timeout, f"{addr.host}:{addr.port}")

    def route(self, server: SocksServer, request: Request) -> None:
        """Where a request goes: a machine's TCP service, the HTTP front, or nowhere."""
        self.total += 1
        asked = f"{request.host}:{request.port}"
        if request.kind != NAME:
            server.refuse(NOT_ALLOWED, f"{asked}: an IP address; only malai names are served ({NAMES}): "
                                             "let the client send names (socks5h://, curl --socks5-hostname)")
            return
        name = request.host.lower().rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            self._to_front(server, name, asked)
            return
        if check_remote(name) is not None:
            server.refuse(HOST_UNREACHABLE, f"{asked}: not a malai name; only malai names are served ({NAMES})")
            return
        remote = ServiceAddress(*name.split("."))
        try:
            self.context.cluster(remote.cluster).target(remote.machine)
        except MalaiError as e:
            server.refuse(HOST_UNREACHABLE, f"{asked}: {e}")
            return
        relay = _SocksRelay(f"{server.client} → {remote}", lambda r: self._open(r, remote))
        server.hand_to(relay.plain)

    def _open(self, relay: Relay, remote: ServiceAddress) -> None:
        self.active.add(relay)
        relay.done.addBoth(lambda _: self.active.discard(relay))
        self.log.info("{label}", label=relay.label)
        d = open_stream(self.context, remote, "tcp", relay.link)
        d.addErrback(self._failed, relay, remote)

    def _failed(self, failure: Failure, relay: Relay, remote: ServiceAddress) -> None:
        error = failure.value
        why = str(error).removeprefix(f"{remote}: ")  # the label names it
        if isinstance(error, MalaiError):
            code = NOT_ALLOWED if isinstance(error, StreamDenied) else HOST_UNREACHABLE
            self.log.warn("{label}: {why}", label=relay.label, why=why)
        else:
            code, why = FAILURE, f"{type(error).__name__}: {error}"
            self.log.failure("{label}", failure, label=relay.label)
        relay.refuse(reply(code), why)

    def _to_front(self, server: SocksServer, name: str, asked: str) -> None:
        if self.front is None:
            server.refuse(HOST_UNREACHABLE, f"{asked}: no HTTP front to reach it through")
            return
        near, far = _ToFront(), Splice()
        near.other, far.other = far, near
        server.hand_to(near)
        server.transport.pauseProducing()  # until the front answers
        host, port = self.front
        endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(self.context.reactor, host, port,
                                                                               timeout=10)
        d = endpoint.connect(_Quiet(far))

        def connected(_) -> None:
            if server.connected:
                server.succeeded()
                server.transport.resumeProducing()
            self.log.info("{client} → {name} (the HTTP front {host}:{port})", client=server.client, name=name,
                          host=host, port=port)

        def failed(f: Failure) -> None:
            server.refuse(HOST_UNREACHABLE, f"{asked}: the HTTP front at {host}:{port} did not answer: "
                                                  f"{f.getErrorMessage()}")

        d.addCallbacks(connected, failed)


class SocksProxy(ListeningService):
    """``malai socks``: the proxy listening on ``listen`` (``HOST:PORT``); ``front`` is the
    HTTP front's address for ``*.localhost`` names (None: those are refused)."""

    def __init__(self, context, listen: str, front: Optional[Tuple[str, int]]):
        super().__init__(context.reactor, listen_endpoint(listen), _SocksFactory(context, front))
        self.setName("socks")
