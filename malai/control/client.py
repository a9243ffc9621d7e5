"""The CLI's side of the control socket."""

import errno
import os
import stat
from pathlib import Path
from typing import Optional

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.task import deferLater
from twisted.protocols import amp

from malai.errors import MalaiError

__all__ = ["ANSWER_TIMEOUT", "call", "socket_problem"]

#: Waits between connection attempts while the daemon's accept queue is full (about 6 s in all).
CONNECT_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
#: How long a command may take to answer (a rescan of a big cluster takes a while).
ANSWER_TIMEOUT = 120.0


def socket_problem(path: Path) -> Optional[str]:
    """Why the socket at ``path`` must not be trusted, if it must not."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"no control socket at {path}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to you; refusing to use it"
    if st.st_mode & 0o077:
        return (f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, open to others; refusing to use it "
                "(stop that daemon and start malai again)")
    return None


@inlineCallbacks
def call(reactor, socket: Path, command, timeout: float = ANSWER_TIMEOUT, **kwargs):
    """Send one command to the daemon and return its answer; MalaiError when the daemon
    cannot be reached or does not answer within ``timeout`` seconds."""
    problem = socket_problem(socket)
    if problem:
        raise MalaiError(problem)
    proto = yield _connect(reactor, socket)
    late = reactor.callLater(timeout, proto.transport.loseConnection)
    try:
        return (yield proto.callRemote(command, **kwargs))
    except ConnectionClosed:
        if late.called:
            raise MalaiError(f"the daemon did not answer within {timeout:g}s (busy?); see its log") from None
        raise MalaiError("the daemon closed the control connection without answering; see its log") from None
    except amp.UnknownRemoteError:
        raise MalaiError(f"the daemon failed to answer {command.__name__}; see its log") from None
    finally:
        if late.active():
            late.cancel()
            proto.transport.loseConnection()


@inlineCallbacks
def _connect(reactor, socket: Path):
    """Connect, trying again while the daemon's accept queue is full (a crowd of callers)."""
    endpoint = UNIXClientEndpoint(reactor, str(socket), timeout=5)
    for delay in (*CONNECT_RETRIES, None):
        try:
            return (yield connectProtocol(endpoint, amp.AMP()))
        except ConnectError as e:
            if delay is None or e.osError in (errno.ENOENT, errno.ECONNREFUSED):
                reason = os.strerror(e.osError) if e.osError else "no room in its accept queue"
                raise MalaiError(f"cannot connect to the daemon at {socket}: {reason}") from None
        yield deferLater(reactor, delay, lambda: None)
