"""The CLI's side of the control socket."""

import os
import stat
from pathlib import Path
from typing import Optional

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols import amp

from malai.errors import MalaiError

__all__ = ["call", "socket_problem"]


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
def call(reactor, socket: Path, command, **kwargs):
    """Send one command to the daemon and return its answer."""
    problem = socket_problem(socket)
    if problem:
        raise MalaiError(problem)
    proto = yield connectProtocol(UNIXClientEndpoint(reactor, str(socket), timeout=5), amp.AMP())
    try:
        return (yield proto.callRemote(command, **kwargs))
    finally:
        proto.transport.loseConnection()
