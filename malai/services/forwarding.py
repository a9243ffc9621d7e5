"""Forwards: local TCP listeners whose connections are relayed to a machine's service.

``[tcp.NAME]`` in ``malai.toml`` makes one ``TcpForward`` service each; the
``Forwards`` service keeps them in step with the file on every rescan. Each
accepted connection is a stream of the one link to its machine (see DESIGN.md,
layer 3), with flow control of its own.
"""

from typing import Dict, List, Optional, Set

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from malai.config.device import check_remote
from malai.config.models import DeviceConfig, TcpForward
from malai.errors import MalaiError
from malai.peer.relay import LinkEnd, PlainEnd, Relay
from malai.peer.streams import StreamRefused
from malai.services.listening import ListeningService
from malai.services.report import Report, change

__all__ = ["Forwards", "ServiceAddress", "StreamDenied", "TcpForwarder", "listen_endpoint", "open_stream"]


class StreamDenied(MalaiError):
    """The machine refused the stream; the message says which rule decided."""


@attrs.frozen
class ServiceAddress:
    """``<service>.<machine>.<cluster>``."""

    service: str
    machine: str
    cluster: str

    @classmethod
    def parse(cls, text: str) -> "ServiceAddress":
        problem = check_remote(text)
        if problem:
            raise MalaiError(problem)
        return cls(*text.split("."))

    def __str__(self) -> str:
        return f"{self.service}.{self.machine}.{self.cluster}"


def listen_endpoint(local: str) -> str:
    """The endpoint string for ``HOST:PORT`` (``[IPV6]:PORT``)."""
    host, _, port = local.rpartition(":")
    host = host.strip("[]")
    kind = "tcp6" if ":" in host else "tcp"
    return f"{kind}:{port}:interface={host.replace(':', chr(92) + ':')}"


@inlineCallbacks
def open_stream(context, remote: ServiceAddress, kind: str, link_end: LinkEnd):
    """Open a ``kind`` stream to ``remote`` on the link to its machine, for ``link_end``.

    ``context`` is the daemon (or a one-shot stand-in): ``cluster(alias)`` and
    ``pool`` (LinkPool). Fails with a MalaiError that says why."""
    cluster = context.cluster(remote.cluster)
    try:
        yield context.pool.open(cluster.identity, cluster.target(remote.machine), kind, remote.service, link_end)
    except StreamRefused as e:
        raise (StreamDenied if e.code == "NOT_ALLOWED" else MalaiError)(f"{remote}: {e}") from None


class _ForwardFactory(Factory):
    """Each accepted connection: a relay, paused until its stream to the machine is open."""

    log = Logger()
    noisy = False

    def __init__(self, context, forward: TcpForward):
        self.context = context
        self.forward = forward
        self.remote = ServiceAddress.parse(forward.remote)
        self.active: Set[Relay] = set()
        self.total = 0

    def buildProtocol(self, addr) -> PlainEnd:
        relay = Relay(f"tcp.{self.forward.name} ({addr.host}:{addr.port} → {self.remote})", self._open)
        return relay.plain

    def _open(self, relay: Relay) -> None:
        self.total += 1
        self.active.add(relay)
        relay.done.addBoth(lambda _: self.active.discard(relay))
        d = open_stream(self.context, self.remote, "tcp", relay.link)
        d.addErrback(self._failed, relay)

    def _failed(self, failure: Failure, relay: Relay) -> None:
        error = failure.value
        relay.fail(str(error) if isinstance(error, MalaiError) else f"{type(error).__name__}: {error}")


class TcpForwarder(ListeningService):
    """One ``[tcp.NAME]`` forward: listens on its local address while running."""

    def __init__(self, context, forward: TcpForward):
        super().__init__(context.reactor, listen_endpoint(forward.local), _ForwardFactory(context, forward))
        self.forward = forward
        self.setName(f"tcp.{forward.name}")

    def summary(self) -> dict:
        return {"name": self.forward.name, "local": self.address(), "remote": self.forward.remote,
                "active": len(self.factory.active), "total": self.factory.total}


class Forwards(MultiService):
    """Every forward of ``malai.toml`` and its HTTP front, reconciled by ``apply``."""

    def __init__(self, context):
        super().__init__()
        self.context = context
        self.forwarders: Dict[str, TcpForwarder] = {}
        self.http = None  # the HttpFront, when [http] listen is set
        self.setName("forwards")

    def apply(self, device: DeviceConfig, check: bool = False) -> List[Report]:
        """Stop what went away or changed, start what is new."""
        reports = []
        wanted = device.tcp
        for name in sorted(set(self.forwarders) - set(wanted)):
            if not check:
                self.forwarders.pop(name).disownServiceParent()
            reports.append(Report(f"tcp.{name}", "removed"))
        for name, forward in sorted(wanted.items()):
            current = self.forwarders.get(name)
            if current is not None and current.forward == forward:
                continue
            action = "added" if current is None else "reloaded"
            if check:
                reports.append(Report(f"tcp.{name}", action))
                continue
            if current is not None:
                self.forwarders.pop(name).disownServiceParent()
            report, forwarder = self._start(TcpForwarder(self.context, forward), f"tcp.{name}", forward.local,
                                            action)
            if forwarder is not None:
                self.forwarders[name] = forwarder
            reports.append(report)
        reports.extend(self._apply_http(device.http_listen, check))
        return reports

    def _apply_http(self, listen: Optional[str], check: bool) -> List[Report]:
        from malai.services.http_front import HttpFront

        action = change(self.http.listen if self.http is not None else None, listen)
        if action is None:
            return []
        if check:
            return [Report("http", action)]
        if self.http is not None:
            self.http.disownServiceParent()
            self.http = None
        if listen is None:
            return [Report("http", action)]
        report, self.http = self._start(HttpFront(self.context, listen), "http", listen, action)
        return [report]

    def _start(self, service: ListeningService, name: str, local: str, action: str):
        """Start ``service``; (the report, the service or None when it cannot listen)."""
        service.setServiceParent(self)
        failures: list = []
        if service.ready is not None:  # TCP listens at once: its Deferred has already fired
            service.ready.addErrback(failures.append)
        if failures:
            service.disownServiceParent()
            return Report(name, "refused", [f"cannot listen on {local}: {failures[0].getErrorMessage()}"]), None
        return Report(name, action), service

    def summary(self) -> List[dict]:
        return [f.summary() for _, f in sorted(self.forwarders.items())]
