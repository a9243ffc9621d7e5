"""The HTTP front: ``http://<service>.<cluster>.localhost:<port>`` reaches a machine's HTTP service.

A browser connection is read up to the end of its first request head; the
``Host`` picks the machine and service, and from then on the connection is
relayed as it is over an ``http`` stream of the link to the machine. The
machine parses every request, so a later request on the same connection for
another host gets a 421 and the browser opens a new connection for it.

A connection must bring its first head (at most ``MAX_HEAD``) within
``HEAD_TIMEOUT``; one that ends before that is closed at once.
"""

import html
from typing import List, Optional, Tuple

import h11
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from malai.errors import MalaiError
from malai.peer.http_headers import HEAD_TIMEOUT, MAX_HEAD, framing_problem
from malai.peer.relay import PlainEnd, Relay
from malai.services.forwarding import ServiceAddress, StreamDenied, open_stream
from malai.services.listening import ListeningService

__all__ = ["HttpFront", "resolve_host"]

SUFFIX = ".localhost"


def resolve_host(context, host: str) -> Tuple[Optional[ServiceAddress], str]:
    """The service a Host names, or None and why not."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.lower().rstrip(".")
    if not name.endswith(SUFFIX):
        return None, f"{host!r} is not a malai name: use <service>.<cluster>.localhost"
    labels = name[:-len(SUFFIX)].split(".")
    if len(labels) not in (2, 3):
        return None, f"{host!r}: use <service>.<cluster>.localhost or <service>.<machine>.<cluster>.localhost"
    service, cluster = labels[0], labels[-1]
    try:
        svc = context.cluster(cluster)
    except MalaiError:
        return None, f"this device is in no cluster {cluster!r}"
    if len(labels) == 3:
        if svc.resolve(labels[1]) is None:
            return None, f"cluster {cluster} has no machine {labels[1]!r} that this device may reach"
        return ServiceAddress(service, labels[1], cluster), ""  # the machine decides
    machines = [m for m, s in svc.http_services() if s == service]
    if not machines:
        return None, f"no machine of {cluster} offers this device an http service {service!r}"
    if len(machines) > 1:
        return None, (f"{len(machines)} machines of {cluster} offer {service!r} ({', '.join(machines)}): "
                      f"name one, as {service}.{machines[0]}.{cluster}.localhost")
    return ServiceAddress(service, machines[0], cluster), ""


class _FrontEnd(PlainEnd):
    """A browser connection: routed by its first request head, then relayed."""

    front: "_FrontFactory"

    def __init__(self, relay: Relay):
        super().__init__(relay)
        self.head = b""
        self.routed = False  # or answered: the front reads no more heads of its own
        self.deadline = None

    def connectionMade(self) -> None:
        # the relay joins once the first request is routed
        self.deadline = self.front.context.reactor.callLater(self.front.head_timeout, self._head_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.routed:
            super().dataReceived(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            if len(self.head) > MAX_HEAD:
                self._answered()
                self.front.page(self, 431, "Request Header Fields Too Large", "the request head is too large")
            return
        self._answered()
        self.front.route(self, self.head)

    def _answered(self) -> None:
        self.routed = True
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()

    def _head_timed_out(self) -> None:
        self.routed = True
        if self.head:
            self.front.page(self, 408, "Request Timeout", f"no complete request within {self.front.head_timeout:g} s")
        else:  # an idle connection (a browser's spare one): nothing to explain
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self.routed:
            super().readConnectionLost()  # the EOF goes on to the machine
        else:  # no request can come any more
            self._answered()
            self.transport.loseConnection()

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self._answered()
        super().connectionLost(reason)


class _FrontFactory(Factory):
    log = Logger()
    noisy = False
    head_timeout = HEAD_TIMEOUT

    def __init__(self, context, front: "HttpFront"):
        self.context = context
        self.front = front

    def buildProtocol(self, addr) -> _FrontEnd:
        end = Relay(f"http front ({addr.host}:{addr.port})", plain_end=_FrontEnd).plain
        end.front = self
        return end

    def route(self, end: _FrontEnd, head: bytes) -> None:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        parser.receive_data(head)
        try:
            request = parser.next_event()
        except h11.RemoteProtocolError as e:
            self.page(end, 400, "Bad Request", f"malai could not read this request: {e}")
            return
        problem = framing_problem(list(request.headers))
        if problem is not None:
            self.page(end, 400, "Bad Request", problem)
            return
        host = dict(request.headers).get(b"host", b"").decode("ascii", "replace")
        remote, why = resolve_host(self.context, host)
        if remote is None:
            self.page(end, 404, "Not Found", why, listing=True)
            return
        relay = end.relay
        relay.label = f"http {host} → {remote}"
        relay.plain_connected()  # paused until the stream is open
        relay.from_plain(head)
        d = open_stream(self.context, remote, "http", relay.link)
        d.addErrback(self._failed, end, remote)

    def _failed(self, failure: Failure, end: _FrontEnd, remote: ServiceAddress) -> None:
        error = failure.value
        machine = f"{remote.machine}.{remote.cluster}"
        if isinstance(error, StreamDenied):  # the rule and whom it names stay in the logs
            self.log.info("{label}: {error}", label=end.relay.label, error=error)
            self.page(end, 403, "Forbidden", f"{machine} does not let this device use http service {remote.service}")
        elif isinstance(error, MalaiError):
            self.page(end, 502, "Bad Gateway", f"cannot reach {machine}: {error}")
        else:
            self.log.failure("{label}", failure, label=end.relay.label)
            self.page(end, 502, "Bad Gateway", f"cannot reach {machine}")

    def page(self, end: _FrontEnd, status: int, title: str, why: str, listing: bool = False) -> None:
        """Answer with an explanation (and, for a 404, what this device may reach), then close."""
        items = ""
        if listing:
            port = self.front.port_number()
            links = [f'<li><a href="{html.escape(u)}">{html.escape(u)}</a></li>' for u in self._urls(port)]
            items = ("<p>HTTP services this device may reach:</p><ul>" + "".join(links) + "</ul>" if links
                     else "<p>This device may reach no HTTP service.</p>")
        body = (f"<!doctype html><title>{status} {title}</title><h1>{status} {title}</h1>"
                f"<p>malai: {html.escape(why)}</p>{items}\n").encode()
        head = (f"HTTP/1.1 {status} {title}\r\ncontent-type: text/html; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        end.relay.refuse(head + body, f"{status} {why}")

    def _urls(self, port: int) -> List[str]:
        urls = []
        for alias, svc in sorted(self.context.clusters.items()):
            pairs = svc.http_services()
            for machine, service in pairs:
                unique = sum(1 for _, s in pairs if s == service) == 1
                name = f"{service}.{alias}" if unique else f"{service}.{machine}.{alias}"
                urls.append(f"http://{name}.localhost:{port}/")
        return urls


class HttpFront(ListeningService):
    """``[http] listen`` of ``malai.toml``."""

    def __init__(self, context, listen: str):
        from malai.services.forwarding import listen_endpoint

        super().__init__(context.reactor, listen_endpoint(listen), _FrontFactory(context, self))
        self.listen = listen
        self.setName("http")

    def port_number(self) -> int:
        return self.port.getHost().port if self.port is not None else int(self.listen.rsplit(":", 1)[1])

    def urls(self) -> List[str]:
        return self.factory._urls(self.port_number())
