"""The machine's side of an HTTP service: HTTP/1.1 over the peer link, proxied to the upstream.

An ``http`` stream of a peer link carries the caller's HTTP/1.1 connection
as it is (its half-close as END_STREAM). ``HttpSession`` parses it
with h11, sends each request to the upstream over a connection from
``UpstreamPool`` (keep-alive), and streams bodies both ways: each transport
is the other's producer while an exchange runs, so nothing is held whole.
An ``Upgrade`` answered with 101 (WebSocket) turns the rest into a tunnel.

What a caller can make it hold is bounded: a request head is at most
``MAX_HEAD`` and must be complete within ``HEAD_TIMEOUT`` of the connection
falling idle, and pipelined requests wait in the socket (the link stops
being read) until the one before them is answered.
"""

import time
from typing import Dict, List, Optional, Tuple

import h11
from twisted.internet.defer import succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from zope.interface import implementer

from malai.audit import AuditLog
from malai.config.models import HttpService
from malai.p2p.dial import tcp_client
from malai.p2p.link import no_delay
from malai.peer.http_headers import HEAD_TIMEOUT, MAX_HEAD, Caller, framing_problem, request_headers, response_headers
from malai.peer.upstream import CONNECT_TIMEOUT, connect_quietly

__all__ = ["HttpSession", "UpstreamPool"]

MAX_IDLE_PER_UPSTREAM = 8
IDLE_UPSTREAM_TIMEOUT = 30.0
Key = Tuple[str, int, bool]


class Upstream(Protocol):
    """One connection to an upstream, speaking h11 as the client; lent to one session at a time."""

    def __init__(self, key: Key):
        self.key = key
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.session: Optional["HttpSession"] = None
        self.idle_timer = None

    def connectionMade(self) -> None:
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.session is None:
            self.transport.loseConnection()  # an idle upstream has nothing to say
        elif self.h11.our_state is h11.SWITCHED_PROTOCOL:
            self.session.write_raw(data)
        else:
            self.h11.receive_data(data)
            self.session.upstream_events()

    def connectionLost(self, reason=None) -> None:
        self.connected = False
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        if self.session is not None:
            self.session.upstream_lost(reason)

    def send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            self.transport.write(data)

    def reusable(self) -> bool:
        """Done with one exchange and nothing more said: bytes past a response would answer the next caller."""
        return (self.connected and self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
                and not self.h11.trailing_data[0])


class UpstreamPool:
    """Idle keep-alive connections to upstreams, by (host, port, secure)."""

    def __init__(self, reactor):
        self.reactor = reactor
        self._idle: Dict[Key, List[Upstream]] = {}

    def acquire(self, service: HttpService):
        key = (service.host, service.port, service.secure)
        idle = self._idle.get(key, [])
        while idle:
            upstream = idle.pop()
            if upstream.connected:
                upstream.idle_timer.cancel()
                return succeed(upstream)
        endpoint: IStreamClientEndpoint = tcp_client(self.reactor, service.host, service.port, CONNECT_TIMEOUT)
        if service.secure:
            # TLS to an upstream on this machine: encryption, no authentication (see docs/http.md)
            endpoint = wrapClientTLS(CertificateOptions(), endpoint)
        return connect_quietly(endpoint, Upstream(key))

    def release(self, upstream: Upstream) -> None:
        upstream.session = None
        idle = self._idle.setdefault(upstream.key, [])
        if not upstream.reusable() or len(idle) >= MAX_IDLE_PER_UPSTREAM:
            upstream.transport.loseConnection()
            return
        upstream.h11.start_next_cycle()
        idle.append(upstream)
        upstream.idle_timer = self.reactor.callLater(IDLE_UPSTREAM_TIMEOUT, self._expire, upstream)

    def _expire(self, upstream: Upstream) -> None:
        idle = self._idle.get(upstream.key, [])
        if upstream in idle:
            idle.remove(upstream)
        upstream.transport.loseConnection()

    def close(self) -> None:
        for idle in self._idle.values():
            for upstream in idle:
                upstream.idle_timer.cancel()
                upstream.transport.loseConnection()
        self._idle.clear()


@implementer(IHalfCloseableProtocol)
class HttpSession(Protocol):
    """The stream of one HTTP connection from a caller (an ``http`` stream)."""

    log = Logger()
    head_timeout = HEAD_TIMEOUT

    def __init__(self, reactor, service: HttpService, caller: Caller, pool: UpstreamPool, audit: AuditLog,
                 rule: str):
        self.reactor = reactor
        self.service = service
        self.caller = caller
        self.pool = pool
        self.audit = audit
        self.rule = rule
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.upstream: Optional[Upstream] = None
        self.host: Optional[bytes] = None  # the Host of the first request: this link serves that one
        self.request: Optional[h11.Request] = None
        self.timer = None
        self.started = 0.0
        self.responded = False
        self.tunnel = False
        self.waiting = False  # for the upstream connection
        self.caller_closed = False
        self.status = 0

    # -- the link ---------------------------------------------------------------
    def connectionMade(self) -> None:
        self._arm(self.head_timeout, self._head_timed_out)

    def dataReceived(self, data: bytes) -> None:
        self._from_caller(data)

    def readConnectionLost(self) -> None:
        self._from_caller(b"")

    def writeConnectionLost(self) -> None:
        pass

    def _from_caller(self, data: bytes) -> None:
        if self.tunnel:
            if data:
                self.upstream.transport.write(data)
            else:
                self.upstream.transport.loseWriteConnection()
            return
        self.h11.receive_data(data)
        self.caller_events()

    def connectionLost(self, reason=None) -> None:
        self.connected = False
        self._cancel_timer()
        self._abandon_upstream()

    def _abandon_upstream(self) -> None:
        """Drop the upstream of an exchange cut short: it cannot be reused."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if self.connected:
                self._unjoin(upstream)
            upstream.session = None
            upstream.transport.abortConnection()

    def write_raw(self, data: bytes) -> None:
        self.transport.write(data)

    def _send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            self.write_raw(data)

    # -- caller → upstream --------------------------------------------------------
    def caller_events(self) -> None:
        while not self.waiting and self.connected:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                self._error(e.error_status_hint, f"bad request: {e}")
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:  # a pipelined request: it waits in the socket, not here
                self.transport.pauseProducing()
                return
            if isinstance(event, h11.Request):
                self._request(event)
            elif isinstance(event, (h11.Data, h11.EndOfMessage)):
                if self.upstream is not None:
                    self.upstream.send(event)
                    if isinstance(event, h11.EndOfMessage) and not self.responded:
                        self._arm(self.service.timeout, self._timed_out)
                else:  # the rest of a body the upstream answered before reading
                    self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                if self.upstream is None and not self.waiting:
                    self._close()
                    return
                self.caller_closed = True  # the answer still goes back before the link closes
                return

    def _request(self, request: h11.Request) -> None:
        self._cancel_timer()
        self.request = request
        problem = framing_problem(list(request.headers))
        if problem is not None:
            self._error(400, problem)
            return
        if request.method == b"CONNECT":  # a tunnel h11 would open on any 2xx, with no timer left to end it
            self._error(405, "CONNECT is not forwarded; a tcp service carries a raw stream")
            return
        host = dict(request.headers).get(b"host", b"")
        if self.host is None:
            self.host = host
        elif host.lower() != self.host.lower():
            self._error(421, f"this connection serves {self.host.decode()}; open a new one for {host.decode()}")
            return
        self.responded = False
        self.started = time.monotonic()
        self.waiting = True
        self.transport.pauseProducing()  # the body waits until the upstream is there
        d = self.pool.acquire(self.service)
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, upstream: Upstream) -> None:
        self.waiting = False
        if not self.connected:
            self.pool.release(upstream)
            return
        self.upstream = upstream
        upstream.session = self
        service, request = self.service, self.request
        headers = request_headers(list(request.headers), self.caller, f"{service.host}:{service.port}",
                                  service.inject_headers)
        upstream.send(h11.Request(method=request.method, target=request.target, headers=headers))
        upstream.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(upstream.transport, True)
        self.transport.resumeProducing()
        self.caller_events()

    def _connect_failed(self, failure) -> None:
        self.waiting = False
        if self.connected:
            self.transport.resumeProducing()
            self._error(502, f"the upstream of http service {self.service.name} is not answering",
                        f"{self.service.host}:{self.service.port}: {failure.getErrorMessage()}")

    # -- upstream → caller ----------------------------------------------------------
    def upstream_events(self) -> None:
        upstream = self.upstream
        while upstream is not None and upstream is self.upstream:
            try:
                event = upstream.h11.next_event()
            except h11.RemoteProtocolError as e:
                self._upstream_failed("the upstream answered with broken HTTP", str(e))
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.InformationalResponse):
                self._send(h11.InformationalResponse(status_code=event.status_code, reason=event.reason,
                                                     headers=response_headers(list(event.headers),
                                                                              event.status_code)))
                if event.status_code == 101:
                    self._open_tunnel()
                    return
            elif isinstance(event, h11.Response):
                self._cancel_timer()
                self.responded = True
                self.status = event.status_code
                self._send(h11.Response(status_code=event.status_code, reason=event.reason,
                                        headers=response_headers(list(event.headers), event.status_code)))
            elif isinstance(event, h11.Data):
                self._send(event)
            elif isinstance(event, h11.EndOfMessage):
                self._send(h11.EndOfMessage())
                self._exchange_done()
                return
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return

    def upstream_lost(self, reason) -> None:
        if self.tunnel:
            self.transport.loseConnection()
            return
        self._upstream_failed("the upstream closed the connection", reason.getErrorMessage())

    def _upstream_failed(self, why: str, detail: str) -> None:
        self._abandon_upstream()
        if not self.responded:
            self._error(502, why, detail)
        else:  # mid-response: the caller's connection cannot carry an error any more
            self.log.warn("{service}: {why}: {detail}", service=self.service.name, why=why, detail=detail)
            self.transport.loseConnection()

    def _exchange_done(self) -> None:
        upstream, self.upstream = self.upstream, None
        self._unjoin(upstream)
        self._audit(self.status)
        self.pool.release(upstream)
        if self.caller_closed or h11.MUST_CLOSE in (self.h11.our_state, self.h11.their_state):
            self._close()
            return
        self._arm(self.head_timeout, self._head_timed_out)  # for the rest of a body, then the next head
        self._next_cycle()

    def _next_cycle(self) -> None:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.transport.resumeProducing()
            self.caller_events()  # a pipelined request may be waiting

    def _unjoin(self, upstream: Upstream) -> None:
        if upstream.transport is not None:
            upstream.transport.unregisterProducer()
            upstream.transport.resumeProducing()
        if self.transport is not None:
            self.transport.unregisterProducer()
            self.transport.resumeProducing()

    def _open_tunnel(self) -> None:
        """101 Switching Protocols: from here on, bytes pass as they are, for as long as both ends like."""
        self._cancel_timer()
        self.tunnel = True
        self._audit(101)
        caller_rest, _ = self.h11.trailing_data
        upstream_rest, _ = self.upstream.h11.trailing_data
        if upstream_rest:
            self.write_raw(upstream_rest)
        if caller_rest:
            self.upstream.transport.write(caller_rest)
        self.transport.resumeProducing()  # paused while the upgrade was pending

    # -- errors and timeouts ------------------------------------------------------
    def _arm(self, seconds: float, expired) -> None:
        """One timer at a time: for the next request head, then for the upstream's answer."""
        self._cancel_timer()
        self.timer = self.reactor.callLater(seconds, expired)

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        self._abandon_upstream()
        self._error(504, f"the upstream of http service {self.service.name} did not answer within "
                         f"{self.service.timeout} s")

    def _head_timed_out(self) -> None:
        """No complete request head in time: an idle connection just closes, a partial head gets a 408."""
        self.timer = None
        if self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0]:
            self._close()
        else:
            self._error(408, f"no complete request within {self.head_timeout:g} s")

    def _error(self, status: int, why: str, detail: str = "") -> None:
        """Answer with ``status`` and ``why`` when nothing was sent yet, then close; ``detail`` is for
        the log and the audit only."""
        full = f"{why}: {detail}" if detail else why
        self.log.warn("{service} for {caller}: {status} {why}", service=self.service.name,
                      caller=self.caller.name or self.caller.id52, status=status, why=full)
        self._audit(status, full)
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"{status} {_REASONS.get(status, '')}\n\nmalai: {why}\n".encode()
            try:
                self._send(h11.Response(status_code=status, reason=_REASONS.get(status, "").encode(), headers=[
                    (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]))
                self._send(h11.Data(data=body))
                self._send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                pass
        self._close()

    def _close(self) -> None:
        if self.connected:
            self.transport.loseConnection()

    def _audit(self, status: int, error: Optional[str] = None) -> None:
        request = self.request
        self.audit.record(cluster=self.caller.cluster, caller=self.caller.id52, name=self.caller.name,
                          http=self.service.name, decision="allowed", rule=self.rule,
                          method=request.method.decode() if request else "",
                          target=request.target.decode(errors="replace") if request else "", status=status,
                          duration=round(time.monotonic() - self.started, 3), **({"error": error} if error else {}))


_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            421: "Misdirected Request", 431: "Request Header Fields Too Large", 501: "Not Implemented",
            502: "Bad Gateway", 504: "Gateway Timeout"}
