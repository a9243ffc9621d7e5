"""``LanDiscovery``: announce this daemon's identities on the LAN (multicast DNS / DNS-SD) and
learn where the identities other daemons announce can be dialed.

Each identity is announced as ``<label>._malai._tcp.local.`` with the daemon's listen port and
addresses, where the label is a keyed hash of the ID52 and the day (``lan_label``): the LAN
never sees an ID52, and a label changes daily, so a passive listener cannot follow a device
across networks; a peer that knows an ID52 computes its labels. A browser keeps what the LAN
announces (bounded); the address book asks ``hints(id52)`` for an ID52's addresses there.

Discovery runs only on the interfaces the daemon listens on that are not loopback (a wildcard
listener: every non-loopback IPv4 interface): a daemon listening on 127.0.0.1 never multicasts.
zeroconf runs its own thread and asyncio loop; everything it reports comes back to the reactor
with ``callFromThread``, and its blocking start and close run in the reactor's thread pool.
"""

import asyncio
import base64
import hashlib
import time
from collections import OrderedDict
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Dict, Iterable, List, Optional, Tuple

import ifaddr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zeroconf import IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from malai.p2p.dial import MAX_LEARNT
from malai.services.report import Report

__all__ = ["MAX_SEEN", "SERVICE_TYPE", "LanDiscovery", "apply_discovery", "lan_interfaces", "lan_label",
           "lan_labels"]

SERVICE_TYPE = "_malai._tcp.local."
MAX_SEEN = 4096  # announcements kept from the LAN; the oldest go first
RESOLVE_MS = 3000
ROTATE_CHECK = 60.0  # seconds between checks that the day (and so the labels) changed
DAY = 86400


def lan_label(id52: str, day: int) -> str:
    """The DNS-SD instance label of ``id52`` on ``day`` (days since the epoch, UTC): 24 base32hex
    characters of SHA-256 over a fixed prefix, the ID52 and the day."""
    digest = hashlib.sha256(f"malai-lan-v1:{id52}:{day}".encode()).digest()[:15]
    return base64.b32hexencode(digest).decode().lower()


def lan_labels(id52: str, now: Optional[float] = None) -> List[str]:
    """The labels ``id52`` may be announced under now: today's, then yesterday's and tomorrow's
    (clocks differ between devices)."""
    day = int((time.time() if now is None else now) // DAY)
    return [lan_label(id52, d) for d in (day, day - 1, day + 1)]


Interface = Tuple[str, int]  # an IPv4 address and its prefix length


def _host_interfaces() -> List[Interface]:
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip_address(ip.ip).is_loopback:
                out.append((ip.ip, ip.network_prefix))
    return out


def lan_interfaces(listen: Iterable[str], host: Optional[List[Interface]] = None) -> Tuple[List[Interface], int]:
    """The non-loopback IPv4 interfaces among the daemon's TCP listen addresses (``HOST:PORT``;
    a wildcard host: all of them) and the port to announce; ``([], 0)`` when there are none."""
    host = _host_interfaces() if host is None else host
    chosen: List[Interface] = []
    port = 0
    for address in listen:
        name, _, number = address.rpartition(":")
        if not number.isdigit():
            continue  # a UNIX socket
        name = name.strip("[]")
        if name in ("", "0.0.0.0", "::"):
            found = host
        else:
            found = [i for i in host if i[0] == name]
        for interface in found:
            if interface not in chosen:
                chosen.append(interface)
        if found and not port:
            port = int(number)
    return chosen, port


def _on_our_networks(address: str, interfaces: List[Interface]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return isinstance(ip, IPv4Address) and any(
        ip in IPv4Network(f"{a}/{prefix}", strict=False) for a, prefix in interfaces)


class LanDiscovery(Service):
    """Announces every identity of the daemon and browses for the others' announcements."""

    log = Logger()

    def __init__(self, daemon, host: Optional[List[Interface]] = None):
        self.daemon = daemon
        self.reactor = daemon.reactor
        self.interfaces, self.port = lan_interfaces(daemon.addresses(), host)
        self.zc: Optional[Zeroconf] = None
        self.browser = None
        self.announced: Dict[str, ServiceInfo] = {}  # label -> what we announce under it
        self.seen: "OrderedDict[str, List[str]]" = OrderedDict()  # label -> tcp hints, newest last
        self._starting: Optional[Deferred] = None
        self._rotate = LoopingCall(self.sync)
        self._rotate.clock = self.reactor
        self.setName("discovery")

    @property
    def state(self) -> str:
        if not self.interfaces:
            return "off: the daemon listens on no LAN interface"
        return "on" if self.zc is not None else "starting"

    def startService(self) -> None:
        super().startService()
        if not self.interfaces:
            self.log.info("LAN discovery: {state}", state=self.state)
            return
        ips = [a for a, _ in self.interfaces]
        self._starting = deferToThread(Zeroconf, interfaces=ips, ip_version=IPVersion.V4Only)
        self._starting.addCallbacks(self._started, self._failed)

    def _started(self, zc: Zeroconf) -> None:
        self._starting = None
        if not self.running:
            deferToThread(zc.close)
            return
        self.zc = zc
        self._in_loop(self._browse())
        self._rotate.start(ROTATE_CHECK)  # announces now, then follows the day
        self.log.info("LAN discovery on {ips}, announcing port {port}",
                      ips=", ".join(a for a, _ in self.interfaces), port=self.port)

    def _failed(self, failure) -> None:
        self._starting = None
        self.log.warn("LAN discovery could not start: {why}", why=failure.getErrorMessage())

    def stopService(self) -> Deferred:
        super().stopService()
        if self._rotate.running:
            self._rotate.stop()
        zc, self.zc = self.zc, None
        self.announced.clear()
        if zc is None:
            return succeed(None)
        return deferToThread(zc.close)  # says goodbye for every announced label, then stops its thread

    # -- zeroconf's loop ----------------------------------------------------------
    def _in_loop(self, coroutine) -> Deferred:
        """Run ``coroutine`` in zeroconf's loop; the result comes back in the reactor."""
        d: Deferred = Deferred()
        future = asyncio.run_coroutine_threadsafe(coroutine, self.zc.loop)

        def done(f) -> None:
            error = f.exception() if not f.cancelled() else None
            self.reactor.callFromThread(d.errback if error else d.callback, error or (None if f.cancelled()
                                                                                      else f.result()))

        future.add_done_callback(done)
        d.addErrback(lambda f: self.log.warn("LAN discovery: {why}", why=f.getErrorMessage()))
        return d

    async def _browse(self) -> None:
        self.browser = AsyncServiceBrowser(self.zc, SERVICE_TYPE, handlers=[self._changed])

    def _changed(self, zeroconf, service_type, name, state_change) -> None:  # in zeroconf's loop
        label = name[:-len(SERVICE_TYPE) - 1] if name.endswith("." + SERVICE_TYPE) else ""
        if not label:
            return
        if state_change is ServiceStateChange.Removed:
            self.reactor.callFromThread(self._gone, label)
        else:
            asyncio.ensure_future(self._resolve(zeroconf, name, label))

    async def _resolve(self, zeroconf, name: str, label: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(zeroconf, RESOLVE_MS) and info.port:
            self.reactor.callFromThread(self._seen, label, info.parsed_addresses(IPVersion.V4Only), info.port)

    async def _register(self, info: ServiceInfo) -> None:
        await self.zc.async_register_service(info)

    async def _unregister(self, info: ServiceInfo) -> None:
        await self.zc.async_unregister_service(info)

    # -- the reactor's side -----------------------------------------------------------
    def _seen(self, label: str, addresses: List[str], port: int) -> None:
        hints = [f"tcp:{a}:{port}" for a in addresses if _on_our_networks(a, self.interfaces)][:MAX_LEARNT]
        self.seen.pop(label, None)
        if hints:
            self.seen[label] = hints
            while len(self.seen) > MAX_SEEN:
                self.seen.popitem(last=False)

    def _gone(self, label: str) -> None:
        self.seen.pop(label, None)

    def hints(self, id52: str) -> List[str]:
        """Where the LAN says ``id52`` listens (its announcements of the last three days' labels)."""
        out: List[str] = []
        for label in lan_labels(id52):
            out.extend(h for h in self.seen.get(label, ()) if h not in out)
        return out

    def sync(self) -> None:
        """Announce today's label of every identity the daemon holds; withdraw the others."""
        if self.zc is None:
            return
        day = int(time.time() // DAY)
        wanted = {lan_label(svc.identity.id52, day) for svc in self.daemon.clusters.values()}
        for label in set(self.announced) - wanted:
            self._in_loop(self._unregister(self.announced.pop(label)))
        addresses = [a for a, _ in self.interfaces]
        for label in wanted - set(self.announced):
            info = ServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=self.port, server=f"{label}.local.",
                               parsed_addresses=addresses)
            self.announced[label] = info
            self._in_loop(self._register(info))

    def summary(self) -> dict:
        return {"lan_discovery": self.state, "lan_announced": len(self.announced), "lan_seen": len(self.seen)}


def apply_discovery(daemon, lan: Optional[bool], check: bool) -> List[Report]:
    """Start or stop LAN discovery as ``[discovery] lan`` says (None: as it is), and announce the
    identities the daemon holds now."""
    current = getattr(daemon, "discovery", None)
    if lan is None or lan == (current is not None):
        if current is not None and not check:
            current.sync()
        return []
    if check:
        return [Report("discovery", "added" if lan else "removed")]
    if current is not None:
        daemon.book.lan = None
        daemon.discovery = None
        current.disownServiceParent()
        return [Report("discovery", "removed")]
    daemon.discovery = LanDiscovery(daemon)
    daemon.discovery.setServiceParent(daemon)
    daemon.book.lan = daemon.discovery.hints
    return [Report("discovery", "added")]
