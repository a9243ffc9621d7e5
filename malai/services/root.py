"""``MalaiService``: the daemon's root. Owns the lock, the peer stack and one
``ClusterService`` per cluster, and reconciles them with MALAI_HOME on rescan."""

import os
import signal
import time
from typing import Dict, List, Optional, Sequence

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks
from twisted.logger import Logger

import malai
from malai.config import ConfigError
from malai.config.models import LinkLimits, TorSettings
from malai.errors import MalaiError
from malai.home import ClusterEntry, Home
from malai.lock import DaemonLock
from malai.p2p.dial import AddressBook, Dialer
from malai.p2p.link import PeerAddress, server_factory
from malai.p2p.tls import PeerTLS
from malai.peer.http_proxy import UpstreamPool
from malai.peer.links import LinkPool, hello_of, link_factory, when_ready
from malai.peer.mux import MuxLink, MuxSettings
from malai.peer.protocol import HelloInfo, PeerAMPFactory
from malai.peer.relaying import Relayer, relay_endpoint
from malai.peer.streams import StreamRefused, StreamRequest
from malai.services.cluster import ClusterService
from malai.services.discovery import apply_discovery
from malai.services.forwarding import Forwards
from malai.services.listening import ListeningService
from malai.services.memory import MemoryTrim
from malai.services.metrics import apply_metrics
from malai.services.report import Report, change
from malai.services.tor import TorService

__all__ = ["MalaiService"]

IDLE_TIMEOUT = 300.0  # a link with no stream and no command for this long closes
ABORT_GRACE = 1.0  # after aborting what stopping left open, before the lock is released anyway


class MalaiService(MultiService):
    log = Logger()

    def __init__(self, reactor, home: Home, lock: DaemonLock, listen: Sequence[str], control: str,
                 links: LinkLimits = LinkLimits()):
        super().__init__()
        self.reactor = reactor
        self.home = home
        self.lock = lock
        self.stop_timeout = links.drain_time
        self.started_at = time.time()
        self.tls = PeerTLS()
        self.book = AddressBook()
        self.dialer = Dialer(reactor, self.tls, self.book)
        self.hello = HelloInfo()
        self._commands = [PeerAMPFactory(self.hello, dialer, responder=self._responder, idle_timeout=IDLE_TIMEOUT,
                                         clock=reactor) for dialer in (True, False)]
        settings = MuxSettings(max_concurrent_streams=links.max_streams, ping_interval=links.ping_interval,
                               drain_time=links.drain_time)
        dialing, accepting = (link_factory(c, self._answer_stream, settings, reactor) for c in self._commands)
        self.pool = LinkPool(self.dialer, dialing)
        self._accepted = accepting
        self.http_upstreams = UpstreamPool(reactor)
        self.relayer = Relayer(reactor)
        self.tor: Optional[TorService] = None
        self.discovery = None  # [discovery] lan in malai.toml: malai.services.discovery
        self.metrics = self.metrics_listener = None  # [metrics] in malai.toml: malai.services.metrics
        self.dialer.kinds["relay"] = relay_endpoint(
            lambda local, relay: self.pool.get(local, relay, self.dialer.direct_hints(relay)))
        self.accept = server_factory(self.tls, self._route, reactor)  # peer links, direct or arriving through a relay
        self.clusters: Dict[str, ClusterService] = {}
        self.listeners: List[ListeningService] = []
        for description in listen:
            svc = ListeningService(reactor, description, self.accept)
            svc.setServiceParent(self)
            self.listeners.append(svc)
        from malai.control.server import ControlFactory

        self.control = ListeningService(reactor, control, ControlFactory(self))
        self.forwards = Forwards(self)
        self.forwards.setServiceParent(self)
        MemoryTrim(reactor).setServiceParent(self)
        # clusters have a namespace of their own: a cluster may be named "tor" or "forwards"
        self.cluster_services = MultiService()
        self.cluster_services.setServiceParent(self)
        self.started: Deferred = Deferred()

    # -- lifecycle ------------------------------------------------------------
    def startService(self) -> None:
        """Bind peer listeners, load every cluster, then open the control socket:
        once the socket answers, the daemon is ready. ``started`` fires then."""
        self.lock.write_pid()  # again: twistd may have forked since makeService
        super().startService()
        # twistd starts services before the reactor runs; start for real once it does,
        # so the socket answers only when signal handlers are in place.
        self.reactor.callWhenRunning(self._start)

    def _start(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._sighup))
        # SIGTERM is an ordinary stop (exit 0), not twistd's re-raised signal.
        signal.signal(signal.SIGTERM, lambda *_: self.reactor.callFromThread(self._sigterm))
        d = gatherResults([svc.ready for svc in self.listeners], consumeErrors=True)
        d.addCallback(lambda _: self._advertise())
        d.addCallback(lambda _: self.rescan())
        d.addCallback(self.log_reports)
        d.addCallback(lambda _: self.control.setServiceParent(self))
        d.addCallback(lambda _: self.control.ready)
        d.addCallback(lambda _: self.log.info("malai {version} ready, pid {pid}, peers on {listen}",
                                              version=malai.__version__, pid=os.getpid(), listen=self.addresses()))
        d.addErrback(self._fatal)
        d.chainDeferred(self.started)

    def _advertise(self) -> None:
        """Tell peers in ``Hello`` where we listen, so they can dial us back."""
        tcp = [a for a in self.addresses() if a.rpartition(":")[2].isdigit()]  # not UNIX sockets
        self.hello = attrs.evolve(self.hello, addrs=tuple(tcp))
        for factory in self._commands:
            factory.hello = self.hello

    def _fatal(self, failure) -> None:
        """A start-up error (a port in use, say): log it, stop, and exit with status 1."""
        error = failure.value.subFailure.value if hasattr(failure.value, "subFailure") else failure.value
        self.log.critical("cannot start: {error}", error=error)
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self.reactor.stop()

    def _sigterm(self) -> None:
        self.log.info("SIGTERM: stopping")
        self.reactor.stop()

    def _sighup(self) -> None:
        self.log.info("SIGHUP: rescanning every cluster")
        self.log_reports(self.rescan())

    def log_reports(self, reports: List[Report]) -> None:
        for r in reports:
            self.log.info("{cluster}: {action}{problems}", cluster=r.cluster, action=r.action,
                          problems="".join(f"\n  {p}" for p in r.problems))

    @inlineCallbacks
    def stopService(self):
        """Stop accepting, let links finish for up to ``stop_timeout`` seconds, abort those
        left, then release the lock: never later than ``stop_timeout`` + ``ABORT_GRACE``."""
        self.log.info("stopping")
        deadline = self.reactor.seconds() + self.stop_timeout
        for svc in [self.control, *self.listeners]:
            if svc.running:
                yield self._until(svc.stopService(), deadline)
        closing = self.pool.drain(max(0.0, deadline - self.reactor.seconds()))  # open streams may finish
        yield self._until(closing, deadline)
        if not closing.called:
            self._abort_links()
        self.http_upstreams.close()
        yield self._until(DeferredList([closing, super().stopService()]), deadline + ABORT_GRACE)
        self.lock.release()

    def _until(self, d: Optional[Deferred], deadline: float) -> Deferred:
        """Fires when ``d`` does or at ``deadline``, whichever comes first."""
        out: Deferred = Deferred()
        if d is None:
            out.callback(None)
            return out
        call = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()), out.callback, None)

        def fired(result):
            if call.active():
                call.cancel()
                out.callback(None)
            return result

        d.addBoth(fired)
        return out

    def _abort_links(self) -> None:
        links = [link for link in self.pool.links() if not link.closed.called]
        self.log.warn("aborting {count} links still open after {timeout:g}s", count=len(links),
                      timeout=self.stop_timeout)
        for link in links:
            link.transport.abortConnection()

    # -- peers ------------------------------------------------------------------
    def _cluster_for(self, local: str) -> Optional[ClusterService]:
        for svc in self.clusters.values():
            if svc.identity.id52 == local:
                return svc
        return None

    def _responder(self, addr: PeerAddress):
        cluster = self._cluster_for(addr.local)
        return cluster.responder_for(addr) if cluster is not None else None

    def _answer_stream(self, request: StreamRequest):
        """A stream the peer opened on any link: its cluster's responder answers."""
        cluster = self._cluster_for(request.peer.local)
        if cluster is None:
            raise StreamRefused("this device no longer serves that cluster", "NOT_ALLOWED")
        return cluster.stream_responder()(request)

    def _route(self, addr: PeerAddress) -> Optional[MuxLink]:
        cluster = self._cluster_for(addr.local)
        if cluster is not None and not cluster.knows(addr.peer) and cluster.admits(addr.peer):
            return self._accepted.buildProtocol(addr)  # a stranger with an invite: JoinCluster only, never pooled
        if cluster is None or not cluster.knows(addr.peer):
            return None
        link = self._accepted.buildProtocol(addr)
        when_ready(link).addCallbacks(self._accepted_link, lambda f: None)  # a refusal is logged by the link
        return link

    def _accepted_link(self, link: MuxLink) -> None:
        """Reuse a link the peer opened, learn where it listens, tell its cluster."""
        self.pool.adopt(link)
        observed = getattr(link.peer.address, "host", "")
        hints = self.book.advertise(link.peer.peer, hello_of(link).get("addrs", ()), observed)
        cluster = self._cluster_for(link.peer.local)
        if cluster is not None:
            cluster.peer_connected(link.peer.peer, hints)

    def addresses(self) -> List[str]:
        return [svc.address() for svc in self.listeners]

    def links_of(self, svc: ClusterService) -> List[dict]:
        """The open request/response links of a cluster's identity, with the path each took."""
        me = svc.identity.id52  # encoded once, not once per link
        return [{"peer": svc.name_of(link.peer.peer), "path": link.peer.hint or "inbound",
                 "rtt": link.rtt, "streams": len(link.streams)}
                for link in self.pool.links() if link.peer.local == me]

    # -- rescan -----------------------------------------------------------------
    def rescan(self, only: Optional[str] = None, check: bool = False) -> List[Report]:
        """Validate everything, then apply only what differs; a broken cluster is
        refused and keeps running as it was, the others are untouched."""
        reports: List[Report] = []
        lan = None  # LAN discovery as it is, unless malai.toml is read now
        if only is None:
            try:
                device = self.home.load_device()
            except ConfigError as e:
                reports.append(Report("malai.toml", "refused", [str(p) for p in e.problems]))
            else:
                lan = device.lan
                reports.extend(self.forwards.apply(device, check))
                reports.extend(self._apply_tor(device.tor, check))
                reports.extend(apply_metrics(self, device.metrics, check))
        entries = self.home.scan(only)
        by_id52: Dict[str, str] = {}
        for entry in entries:
            problems = list(entry.problems)
            if entry.id52 and by_id52.setdefault(entry.id52, entry.alias) != entry.alias:
                problems.append(f"{entry.path}: same identity as cluster {by_id52[entry.id52]}; "
                                "every cluster needs its own key")
            if problems:
                reports.append(Report(entry.alias, "refused", problems))
            else:
                reports.append(Report(entry.alias, self._apply(entry, check)))
        if only is None:
            present = {e.alias for e in entries}
            for alias in sorted(set(self.clusters) - present):
                if not check:
                    self._remove(alias)
                reports.append(Report(alias, "removed"))
        reports.extend(apply_discovery(self, lan, check))  # announces the identities held now
        return reports

    def _apply(self, entry: ClusterEntry, check: bool) -> str:
        current = self.clusters.get(entry.alias)
        if current is None:
            action = "added"
        elif current.entry == entry:
            return "unchanged"
        else:
            action = "reloaded"
        if check:
            return action
        if current is not None and (current.identity.id52 != entry.id52 or current.role != entry.role):
            self._remove(entry.alias)
            current = None
        if current is None:
            self._add(entry)
        else:
            current.reconfigure(entry)
            self._configure_book(current)
        return action

    def _add(self, entry: ClusterEntry) -> None:
        svc = ClusterService(entry, daemon=self)
        self.tls.add(svc.identity)
        self._configure_book(svc)
        self.clusters[entry.alias] = svc
        svc.setServiceParent(self.cluster_services)
        if self.tor is not None:
            self.tor.sync()

    def _apply_tor(self, settings: Optional[TorSettings], check: bool) -> List[Report]:
        action = change(self.tor.settings if self.tor is not None else None, settings)
        if action is None:
            return []
        if check:
            return [Report("tor", action)]
        if self.tor is not None:
            self.tor.disownServiceParent()
            self.tor = None
            self.dialer.kinds.pop("tor", None)
        if settings is not None:
            self.tor = TorService(self, settings)
            self.tor.setServiceParent(self)
            self.dialer.kinds["tor"] = self.tor.endpoint
        return [Report("tor", action)]

    def _configure_book(self, svc: ClusterService) -> None:
        for id52, hints in svc.addresses().items():
            self.book.configure(id52, hints)

    def _remove(self, alias: str) -> Deferred:
        svc = self.clusters.pop(alias)
        self.tls.remove(svc.identity.id52)
        if self.tor is not None:
            self.tor.sync()
        closing = self.pool.close(svc.identity.id52)
        stopped = svc.disownServiceParent()
        return DeferredList([closing, stopped]) if stopped is not None else closing

    # -- control --------------------------------------------------------------
    def status(self) -> dict:
        clusters = []
        for svc in self.clusters.values():
            links = self.links_of(svc)
            clusters.append({**svc.summary(), "links": len(links), "peer_links": links})
        return {"pid": os.getpid(), "version": malai.__version__, "uptime": time.time() - self.started_at,
                "listen": self.addresses(), "clusters": clusters, "forwards": self.forwards.summary(),
                "http_urls": self.forwards.http.urls() if self.forwards.http else [],
                **{f"relay_{k}": v for k, v in self.relayer.summary().items()},
                **(self.tor.summary() if self.tor is not None else {"tor": "off", "onions": []}),
                **(self.discovery.summary() if self.discovery is not None else {"lan_discovery": "off"}),
                **({"http": self.forwards.http.address()} if self.forwards.http else {})}

    def cluster(self, alias: str) -> ClusterService:
        try:
            return self.clusters[alias]
        except KeyError:
            raise MalaiError(f"this daemon serves no cluster {alias!r}; clusters: "
                             f"{', '.join(self.clusters) or 'none'}") from None
