"""The daemon's side of the control socket: each command delegates to ``MalaiService``."""

import resource
from typing import Optional

from twisted.internet.defer import CancelledError, inlineCallbacks
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
from malai.peer import exec_header
from malai.peer.links import dial_ready
from malai.peer.ping import ping
from malai.peer.protocol import QuietAMP
from malai.peer.splice import splice_pair
from malai.peer.streams import StreamRefused
from malai.services.publisher import laggards

__all__ = ["ControlFactory", "ControlProtocol"]


class ControlProtocol(InventoryLocator, QuietAMP):
    log = Logger()

    def __init__(self, root, listener: Optional["ControlFactory"] = None):
        super().__init__()
        self.root = root
        self.listener = listener if listener is not None else ControlFactory(root)  # counts the sessions
        self._session = False  # this connection counts as one of the listener's sessions
        self._exec_opening = None  # the exec stream being opened for this caller

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if self._session:
            self.listener.sessions -= 1
        if self._exec_opening is not None:  # the caller left: the stream is reset, the machine kills what it started
            self._exec_opening.cancel()

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
                link = yield dial_ready(self.root.dialer, svc.identity, peer_id52, self.root.pool.factory, addrs)
                try:
                    result = yield ping(link)
                finally:
                    link.close("ping done")
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
        """Open an exec stream on the link to the machine, then splice this connection to
        it: exec frames pass through untouched."""
        try:
            svc = self.root.cluster(cluster)
            peer = svc.target(machine)
        except MalaiError as e:
            raise UnknownTarget(str(e)) from None
        try:
            headers = exec_header.encode(argv, tty, term, rows, cols, timeout, line, subsystem)
        except ValueError as e:
            raise ControlFailed(str(e)) from None
        if self.listener.sessions >= self.listener.max_sessions:
            raise ControlFailed(f"this daemon runs {self.listener.max_sessions} sessions at once, as many as its "
                                "open-files limit allows; try again later (or raise the limit: LimitNOFILE=)")
        self.listener.sessions += 1
        self._session = True
        ours, theirs, _ = splice_pair()
        self._exec_opening = self.root.pool.open(svc.identity, peer, "exec", machine, theirs, headers)
        try:
            yield self._exec_opening
        except StreamRefused as e:
            if e.code == "NOT_ALLOWED":
                raise ExecDenied(str(e)) from None
            if e.code in ("BAD_REQUEST", "EXEC_FAILED"):
                raise ControlFailed(str(e)) from None
            raise Unreachable(f"{machine}.{cluster}: {_text(e)}") from None
        except CancelledError:
            return None  # the caller left
        except Exception as e:
            raise Unreachable(f"cannot reach {machine}.{cluster}: {_text(e)}") from None
        finally:
            self._exec_opening = None
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
    """Exec sessions at once: each holds the caller's connection here (its stream shares the
    machine's link); the rest of the open-files limit stays for everything else."""
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
