"""``Splice``: join two connections byte for byte, each the other's producer."""

from typing import Callable, List, Optional, Tuple

from twisted.internet.protocol import Factory, Protocol

__all__ = ["Splice", "SwitchTo", "splice_pair"]


class Splice(Protocol):
    """One end of a splice; data for the other end waits until it is connected."""

    def __init__(self) -> None:
        self.other: Optional["Splice"] = None
        self._waiting: List[bytes] = []
        self._closed = False
        self.carried = 0  # bytes received on this end
        self.on_close: Optional[Callable[["Splice"], None]] = None

    def connectionMade(self) -> None:
        other = self.other
        if other is None or other.transport is None:
            return  # the first end: wait for the second
        for end in (self, other):
            for data in end._waiting:
                end.other.transport.write(data)
            end._waiting.clear()
        if other._closed:
            self.transport.loseConnection()
            return
        self.transport.registerProducer(other.transport, True)
        other.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.carried += len(data)
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self._waiting.append(data)

    def connectionLost(self, reason=None) -> None:
        self._closed = True
        if self.on_close is not None:
            self.on_close(self)
        other = self.other
        if other is not None and other.transport is not None and not other._closed:
            other.transport.unregisterProducer()
            other.transport.loseConnection()


class SwitchTo(Factory):
    """A factory handing out one ready-made protocol: what an AMP protocol switch builds."""

    def __init__(self, protocol: Protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self.protocol_instance

    def clientConnectionLost(self, connector, reason) -> None:
        pass

    def clientConnectionFailed(self, connector, reason) -> None:
        pass


def splice_pair() -> Tuple[Splice, Splice, Factory]:
    """Two joined ends, and a factory giving the second (for ``ProtocolSwitchCommand``)."""
    a, b = Splice(), Splice()
    a.other, b.other = b, a
    return a, b, SwitchTo(b)
