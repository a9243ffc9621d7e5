"""Round trips over a peer link."""

import os
import time

import attrs
from twisted.internet.defer import inlineCallbacks

from malai.peer.commands import Ping

__all__ = ["PingResult", "ping"]


@attrs.frozen
class PingResult:
    rtt: float  # seconds
    address: str  # the hint the link was made over, or "inbound"
    version: str  # the peer's malai version


@inlineCallbacks
def ping(link):
    """One Ping over ``link``; checks the echo."""
    payload = os.urandom(16)
    start = time.perf_counter()
    answer = yield link.callRemote(Ping, payload=payload)
    rtt = time.perf_counter() - start
    if answer["payload"] != payload:
        raise ValueError("the peer answered a ping with the wrong payload")
    return PingResult(rtt, link.peer.hint or "inbound link", answer["version"])
