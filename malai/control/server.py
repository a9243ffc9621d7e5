"""The daemon's side of the control socket: each command delegates to ``MalaiService``."""

from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from malai.control.commands import ControlFailed, Ping, Rescan, Status, Stop
from malai.errors import MalaiError
from malai.identity import ID52Error, parse_id52
from malai.peer.ping import ping

__all__ = ["ControlFactory", "ControlProtocol", "resolve_target"]


class ControlProtocol(amp.AMP):
    log = Logger()

    def __init__(self, root):
        super().__init__()
        self.root = root

    @Status.responder
    def status(self) -> dict:
        return self.root.status()

    @Rescan.responder
    def rescan(self, check: bool, cluster=None) -> dict:
        try:
            reports = self.root.rescan(cluster, check=check)
        except MalaiError as e:
            raise ControlFailed(str(e)) from None
        if not check:
            self.root.log_reports(reports)
        return {"reports": [r.as_dict() for r in reports]}

    @Stop.responder
    def stop(self) -> dict:
        self.log.info("stop requested over the control socket")
        self.root.reactor.callLater(0, self.root.reactor.stop)
        return {}

    @Ping.responder
    @inlineCallbacks
    def ping(self, cluster: str, peer: str, addrs: list):
        try:
            svc = self.root.cluster(cluster)
            peer_id52 = resolve_target(svc, peer)
            link = yield self.root.pool.get(svc.identity, peer_id52, addrs or None)
            result = yield ping(link)
        except MalaiError as e:
            raise ControlFailed(str(e)) from None
        except Exception as e:  # a link that dropped mid-ping, a refused Hello
            raise ControlFailed(f"ping {peer}: {e}") from None
        return {"rtt": result.rtt, "address": result.address, "version": result.version}


def resolve_target(svc, peer: str) -> str:
    try:
        return parse_id52(peer)
    except ID52Error:
        pass
    id52 = svc.resolve(peer)
    if id52 is None:
        raise MalaiError(f"cluster {svc.name} has no machine {peer!r} that this device may reach")
    return id52


class ControlFactory(Factory):
    noisy = False

    def __init__(self, root):
        self.root = root

    def buildProtocol(self, addr) -> ControlProtocol:
        return ControlProtocol(self.root)
