"""The daemon's side of the control socket: each command delegates to ``MalaiService``."""

import resource
from typing import Optional

from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from malai.control.commands import (
    SUMMARY_LISTS,
    ControlFailed,
    Exec,
    ExecDenied,
    Machines,
    Ping,
    Rescan,
    Status,
    Stop,
    UnknownTarget,
    Unreachable,
)
from malai.control.inventory import InventoryLocator
from malai.errors import MalaiError
from malai.peer.links import dial_ready
from malai.peer.ping import ping
from malai.peer.protocol import PeerAMPFactory, QuietAMP
from malai.services.publisher import laggards

__all__ = ["ControlFactory", "ControlProtocol"]


class ControlProtocol(InventoryLocator, QuietAMP):
    log = Logger()

    def __init__(self, root, listener: Optional["ControlFactory"] = None):
        super().__init__()
        self.root = root
        self.listener = listener if listener is not None else ControlFactory(root)  # counts the sessions
        self._session = False  # this connection counts as one of the listener's sessions
        self._exec_link = None  # the link an Exec in flight asked to run a command

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if self._session:
            self.listener.sessions -= 1
        if self._exec_link is not None:  # the caller left: the machine kills what it started
            self._exec_link.transport.loseConnection()

    @Status.responder
    def status(self, summary: bool = False) -> dict:
        status = self.root.status()
        if summary:
            for cluster in status["clusters"]:
                cluster["sync"] = laggards(cluster["sync"], SUMMARY_LISTS)
                cluster["peer_links"] = cluster["peer_links"][:SUMMARY_LISTS]
        return status

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
            peer_id52 = svc.target(peer)
            if addrs:  # this path, on a link of its own: the pooled one may have come another way
                link = yield dial_ready(self.root.dialer, svc.identity, peer_id52,
                                        PeerAMPFactory(self.root.hello, dialer=True), addrs)
                try:
                    result = yield ping(link)
                finally:
                    link.transport.loseConnection()
            else:
                link = yield self.root.pool.get(svc.identity, peer_id52)
                result = yield ping(link)
        except MalaiError as e:
            raise ControlFailed(str(e)) from None
        except Exception as e:  # a link that dropped mid-ping, a refused Hello
            raise ControlFailed(f"ping {peer}: {e}") from None
        return {"rtt": result.rtt, "address": result.address, "version": result.version}


    @Exec.responder
    @inlineCallbacks
    def exec(self, cluster, machine, argv, tty, term, rows, cols, timeout=None, line=None, subsystem=None):
        """Open a link of its own to the machine, ask it to run ``argv``, then splice
        this connection to that link: frames pass through untouched."""
        from malai.peer.commands import ExecFailed, NotAllowed, OpenExec
        from malai.peer.splice import splice_pair

        try:
            svc = self.root.cluster(cluster)
            peer = svc.target(machine)
        except MalaiError as e:
            raise UnknownTarget(str(e)) from None
        if self.listener.sessions >= self.listener.max_sessions:
            raise ControlFailed(f"this daemon runs {self.listener.max_sessions} sessions at once, as many as its "
                                "open-files limit allows; try again later (or raise the limit: LimitNOFILE=)")
        self.listener.sessions += 1
        self._session = True
        try:
            link = yield self.root.streams.take(svc.identity, peer)
        except Exception as e:
            raise Unreachable(f"cannot reach {machine}.{cluster}: {_text(e)}") from None
        if self.transport is None:  # the caller left while the link was dialed
            link.transport.loseConnection()
            return None
        ours, theirs, factory = splice_pair()
        self._exec_link = link
        try:
            yield link.callRemote(OpenExec, _protoToSwitchToFactory=factory, argv=argv, tty=tty, term=term,
                                  rows=rows, cols=cols, timeout=timeout, line=line, subsystem=subsystem)
        except NotAllowed as e:
            link.transport.loseConnection()
            raise ExecDenied(str(e)) from None
        except ExecFailed as e:
            link.transport.loseConnection()
            raise ControlFailed(str(e)) from None
        except Exception as e:
            raise Unreachable(f"{machine}.{cluster} dropped the link: {_text(e)}") from None
        finally:
            self._exec_link = None
        if self.transport is None:  # the caller left while the machine started the command
            link.transport.loseConnection()
        return ours

    @Machines.responder
    def machines(self, cluster):
        try:
            return {"machines": self.root.cluster(cluster).exec_targets()}
        except MalaiError as e:
            raise UnknownTarget(str(e)) from None


def _text(error: Exception) -> str:
    return str(error) or type(error).__name__


def session_limit() -> int:
    """Exec sessions at once: each holds two descriptors here (the caller's connection and
    its link); a quarter of the open-files limit stays for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft * 3 // 8) if soft != resource.RLIM_INFINITY else 1 << 20


class ControlFactory(Factory):
    noisy = False

    def __init__(self, root, max_sessions: Optional[int] = None):
        self.root = root
        self.sessions = 0  # Exec sessions, from their request to the end of their connection
        self.max_sessions = session_limit() if max_sessions is None else max_sessions

    def buildProtocol(self, addr) -> ControlProtocol:
        return ControlProtocol(self.root, self)
