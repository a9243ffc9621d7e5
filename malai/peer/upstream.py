"""The machine's side of a forwarded service: authorise the stream, connect its upstream.

A stream is answered only once the upstream is connected, so a caller whose
service is down learns why at once instead of holding a dead connection.
"""

import time
from typing import Optional, Tuple, Union

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from malai.acl import Acl, Decision, Denied
from malai.audit import AuditLog
from malai.config.models import HttpService, MachineConfig, TcpService
from malai.p2p.dial import tcp_client
from malai.p2p.link import PeerAddress
from malai.peer.proxy_header import proxy_v2
from malai.peer.relay import LinkEnd, Relay
from malai.peer.streams import StreamRefused

__all__ = ["CONNECT_TIMEOUT", "authorise", "connect_quietly", "open_tcp"]

CONNECT_TIMEOUT = 10.0
log = Logger()


def authorise(config: Optional[MachineConfig], caller: str, kind: str, service: str
              ) -> Tuple[Union[TcpService, HttpService], Decision]:
    """The service ``caller`` may reach and the rule that allowed it, or ``Denied``."""
    if kind not in ("tcp", "http"):
        raise Denied(Decision(False, "stream", f"there is no {kind!r} kind of service; tcp or http"))
    if config is None:
        raise Denied(Decision(False, "machine.toml", "this machine has no config from its manager yet"))
    decision = Acl.for_machine(config).can_reach(config.machine, kind, service, caller)
    if not decision:
        raise Denied(decision)
    services = config.machine.tcp if kind == "tcp" else config.machine.http
    return services[service], decision


@inlineCallbacks
def open_tcp(reactor, service: TcpService, decision: Decision, peer: PeerAddress, caller_name: str, cluster: str,
             audit: AuditLog):
    """Connect ``service``'s upstream and return the link end of a relay to it."""
    who = caller_name or peer.peer
    relay = Relay(f"{cluster}: tcp.{service.name} for {who}")
    endpoint = tcp_client(reactor, service.host, service.port, CONNECT_TIMEOUT)
    try:
        yield connect_quietly(endpoint, relay.plain)
    except Exception as e:
        why = f"tcp service {service.name}: cannot connect to {service.host}:{service.port}: {_reason(e)}"
        log.warn("{cluster}: {who}: {why}", cluster=cluster, who=who, why=why)
        audit.record(cluster=cluster, caller=peer.peer, name=caller_name, tcp=service.name, decision="failed",
                     rule=why)
        raise StreamRefused(why, "UPSTREAM_FAILED") from None
    if service.proxy_protocol:
        upstream = relay.plain.transport.getPeer()
        source = getattr(peer.address, "host", ""), getattr(peer.address, "port", 0)
        relay.plain.transport.write(proxy_v2(source, (upstream.host, upstream.port), peer.peer, caller_name))
    started = time.monotonic()

    def ended(reason):
        audit.record(cluster=cluster, caller=peer.peer, name=caller_name, tcp=service.name, decision="allowed",
                     rule=str(decision), bytes_in=relay.bytes_to_plain, bytes_out=relay.bytes_to_link,
                     duration=round(time.monotonic() - started, 3), error=reason)

    relay.done.addCallback(ended)
    link_end: LinkEnd = relay.link
    return link_end


class _OneProtocol(Factory):
    noisy = False  # no "Starting factory" line per upstream connection

    def __init__(self, protocol: Protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self.protocol_instance


def connect_quietly(endpoint, protocol: Protocol) -> Deferred:
    """``connectProtocol`` without its log lines: fires with ``protocol`` once connected."""
    return endpoint.connect(_OneProtocol(protocol))


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return text.rstrip(".") or type(error).__name__
