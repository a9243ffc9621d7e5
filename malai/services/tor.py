"""``TorService``: every identity of the daemon as an onion service, and ``tor:`` dialing.

Each cluster identity hosts the onion service whose address is its own
ed25519 key (``malai.p2p.onion``), pointing at a UNIX socket of the daemon
that accepts peer links like any listener: a machine needs no TCP listener
at all to be reachable. ``tor:<onion>:<port>`` hints go out through Tor's
SOCKS port; the pinned TLS runs inside, so Tor is a transport, not a trust.
"""

from typing import Dict

import txtorcon
from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from malai.config.models import TorSettings
from malai.identity import Identity
from malai.p2p.dial import DialError
from malai.p2p.onion import ONION_PORT, onion_address, onion_secret
from malai.services.listening import ListeningService

__all__ = ["TorService", "tor_hint"]


def tor_hint(id52: str) -> str:
    return f"tor:{onion_address(id52)}:{ONION_PORT}"


class TorService(Service):
    log = Logger()

    def __init__(self, daemon, settings: TorSettings):
        self.daemon = daemon
        self.settings = settings
        self.tor = None
        self.state = "connecting"
        self.onions: Dict[str, object] = {}  # id52 -> txtorcon onion service (or None while being created)
        path = str(daemon.home.root / "tor.socket").replace(":", "\\:")
        self.listener = ListeningService(daemon.reactor, f"unix:{path}:mode=600:lockfile=0", daemon.accept)
        self.setName("tor")

    def startService(self) -> None:
        super().startService()
        self.listener.startService()
        d = self._connect()
        d.addCallbacks(self._connected, self._failed)

    @inlineCallbacks
    def _connect(self):
        reactor = self.daemon.reactor
        if self.settings.mode == "control":
            tor = yield txtorcon.connect(reactor, clientFromString(reactor, self.settings.control))
        else:
            tor = yield txtorcon.launch(reactor, data_directory=str(self.daemon.home.root / "tor"))
        return tor

    def _connected(self, tor) -> None:
        if not self.running:
            return
        self.tor = tor
        self.state = "running"
        self.log.info("Tor connected ({how})", how=self.settings.control or "launched")
        self.sync()

    def _failed(self, failure) -> None:
        self.state = f"failed: {failure.getErrorMessage()}"
        self.log.error("cannot use Tor ({how}): {why}", how=self.settings.control or "launch",
                       why=failure.getErrorMessage())

    def sync(self) -> None:
        """Host an onion service for every cluster identity, and no other."""
        if self.tor is None:
            return
        wanted = {svc.identity.id52: svc.identity for svc in self.daemon.clusters.values()}
        for id52 in set(self.onions) - set(wanted):
            service = self.onions.pop(id52)
            if service is not None:
                service.remove()
        for id52, identity in wanted.items():
            if id52 not in self.onions:
                self.onions[id52] = None
                self._host(identity).addErrback(self._host_failed, id52)

    @inlineCallbacks
    def _host(self, identity: Identity):
        target = "unix:" + str(self.daemon.home.root / "tor.socket")
        service = yield self.tor.create_onion_service([(ONION_PORT, target)], private_key=onion_secret(identity),
                                                      version=3, await_all_uploads=False)
        expected = onion_address(identity.id52)
        if service.hostname != expected:
            service.remove()
            raise RuntimeError(f"Tor hosts {service.hostname}, not {expected}")
        if identity.id52 not in self.onions:  # its cluster went away meanwhile
            service.remove()
            return
        self.onions[identity.id52] = service
        self.log.info("onion service {onion} up for {id52}", onion=expected, id52=identity.id52)

    def _host_failed(self, failure, id52: str) -> None:
        self.onions.pop(id52, None)
        self.log.error("cannot host the onion service of {id52}: {why}", id52=id52, why=failure.getErrorMessage())

    def endpoint(self, local: Identity, peer: str, hint: str):
        """The ``tor`` kind for ``Dialer.kinds``: through Tor's SOCKS port."""
        if self.tor is None:
            raise DialError(f"Tor is not usable yet ({self.state})")
        host, _, port = hint.split(":", 1)[1].rpartition(":")
        return self.tor.stream_via(host, int(port))

    def summary(self) -> dict:
        up = sorted(onion_address(i) for i, s in self.onions.items() if s is not None)
        return {"tor": self.state, "onions": up}

    def stopService(self):
        super().stopService()
        for service in self.onions.values():
            if service is not None:
                service.remove()
        self.onions.clear()
        if self.tor is not None and self.settings.mode == "launch":
            self.tor.quit()
        return self.listener.stopService()

