"""Forwards: local TCP listeners whose connections are relayed to a machine's service.

``[tcp.NAME]`` in ``malai.toml`` makes one ``TcpForward`` service each; the
``Forwards`` service keeps them in step with the file on every rescan. Each
accepted connection gets a peer link of its own (see DESIGN.md, layer 3), so
TCP's flow control is per forwarded connection.
"""

from typing import Dict, List, Set

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from malai.config.device import check_remote
from malai.config.models import TcpForward
from malai.errors import MalaiError
from malai.peer.commands import NotAllowed, OpenStream, UpstreamFailed
from malai.peer.relay import LinkEnd, Relay
from malai.peer.splice import SwitchTo
from malai.services.listening import ListeningService
from malai.services.report import Report

__all__ = ["Forwards", "ServiceAddress", "TcpForwarder", "listen_endpoint", "open_stream"]


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
    """Dial ``remote``'s machine on a link of its own and hand the link to ``link_end``.

    ``context`` is the daemon (or a one-shot stand-in): ``cluster(alias)`` and
    ``streams`` (SpareLinks). Fails with a MalaiError that says why."""
    cluster = context.cluster(remote.cluster)
    link = yield context.streams.take(cluster.identity, cluster.target(remote.machine))
    try:
        yield link.callRemote(OpenStream, _protoToSwitchToFactory=SwitchTo(link_end), kind=kind,
                              service=remote.service)
    except (NotAllowed, UpstreamFailed) as e:
        link.transport.loseConnection()
        raise MalaiError(f"{remote}: {e}") from None


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

    def buildProtocol(self, addr) -> Relay:
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
    """Every forward of ``malai.toml``, reconciled by ``apply``."""

    def __init__(self, context):
        super().__init__()
        self.context = context
        self.forwarders: Dict[str, TcpForwarder] = {}
        self.setName("forwards")

    def apply(self, wanted: Dict[str, TcpForward], check: bool = False) -> List[Report]:
        """Stop the forwards that went away or changed, start the new ones."""
        reports = []
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
            reports.append(self._start(forward, action))
        return reports

    def _start(self, forward: TcpForward, action: str) -> Report:
        forwarder = TcpForwarder(self.context, forward)
        forwarder.setServiceParent(self)
        failures: list = []
        if forwarder.ready is not None:  # TCP listens at once: its Deferred has already fired
            forwarder.ready.addErrback(failures.append)
        if failures:
            forwarder.disownServiceParent()
            return Report(f"tcp.{forward.name}", "refused",
                          [f"cannot listen on {forward.local}: {failures[0].getErrorMessage()}"])
        self.forwarders[forward.name] = forwarder
        return Report(f"tcp.{forward.name}", action)

    def summary(self) -> List[dict]:
        return [f.summary() for _, f in sorted(self.forwarders.items())]
