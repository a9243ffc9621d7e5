"""``ListeningService``: a named service listening on one endpoint string."""

from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory

__all__ = ["BACKLOG", "ListeningService", "with_backlog"]

#: Twisted listens with a backlog of 50; a burst of new connections beyond it
#: (a connection pool warming up, a load test) would wait out SYN retransmits,
#: or on a UNIX socket (the control socket) be refused with EAGAIN.
BACKLOG = 1024


def with_backlog(description: str) -> str:
    """``description`` with ``backlog=BACKLOG`` when it is a TCP or UNIX endpoint that sets none."""
    if description.split(":", 1)[0] in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={BACKLOG}"
    return description


class ListeningService(Service):
    """Listens while running; ``ready`` fires with the port (or the failure to listen)."""

    def __init__(self, reactor, description: str, factory: Factory):
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port: Optional[IListeningPort] = None
        self.ready: Optional[Deferred] = None
        self.setName(f"listen {description}")

    def startService(self) -> None:
        super().startService()
        self.ready = serverFromString(self.reactor, with_backlog(self.description)).listen(self.factory)
        self.ready.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def stopService(self) -> Deferred:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else succeed(None)

    def address(self) -> str:
        if self.port is None:
            return self.description
        host = self.port.getHost()
        port = getattr(host, "port", None)
        if port is not None:
            return f"{getattr(host, 'host', '')}:{port}"
        name = getattr(host, "name", host)
        return name.decode() if isinstance(name, bytes) else str(name)
