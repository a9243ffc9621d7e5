"""Every AMP command spoken between peers (signatures only; behaviour lives in responders).

Versioned by ``Hello``: the dialer sends it first, and nothing else is
answered until it has been. Values stay under AMP's 64 KiB limit.
"""

from twisted.protocols import amp

__all__ = ["PROTOCOL_VERSION", "Hello", "IncompatibleVersion", "NotAllowed", "Ping"]

#: Bumped on any incompatible change to the commands below.
PROTOCOL_VERSION = 1


class IncompatibleVersion(Exception):
    """The two sides speak different protocol versions."""


class NotAllowed(Exception):
    """The verified peer may not do this; the message says which rule decided."""


class Hello(amp.Command):
    arguments = [
        (b"protocol", amp.Integer()),
        (b"features", amp.ListOf(amp.Unicode())),
        (b"version", amp.Unicode()),
        (b"addrs", amp.ListOf(amp.Unicode())),
    ]
    response = [
        (b"protocol", amp.Integer()),
        (b"features", amp.ListOf(amp.Unicode())),
        (b"version", amp.Unicode()),
    ]
    errors = {IncompatibleVersion: b"INCOMPATIBLE_VERSION"}


class Ping(amp.Command):
    arguments = [(b"payload", amp.String())]
    response = [(b"payload", amp.String()), (b"version", amp.Unicode())]
