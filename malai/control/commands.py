"""AMP commands of the control socket (``$MALAI_HOME/malai.socket``): signatures only."""

from twisted.protocols import amp

__all__ = ["ControlFailed", "Ping", "Rescan", "Status", "Stop"]


class ControlFailed(Exception):
    """A command the daemon could not carry out; the message says why and what to do."""


class Status(amp.Command):
    arguments: list = []
    response = [
        (b"pid", amp.Integer()),
        (b"version", amp.Unicode()),
        (b"uptime", amp.Float()),
        (b"listen", amp.ListOf(amp.Unicode())),
        (b"clusters", amp.AmpList([
            (b"cluster", amp.Unicode()),
            (b"role", amp.Unicode()),
            (b"id52", amp.Unicode()),
            (b"machines", amp.Integer()),
            (b"waiting_for_config", amp.Boolean()),
            (b"config_version", amp.Integer()),
            (b"links", amp.Integer()),
            (b"sync", amp.AmpList([
                (b"machine", amp.Unicode()),
                (b"version", amp.Integer()),
                (b"sync", amp.Unicode()),
                (b"last_seen", amp.Float()),
                (b"error", amp.Unicode()),
            ])),
        ])),
    ]


class Rescan(amp.Command):
    arguments = [(b"cluster", amp.Unicode(optional=True)), (b"check", amp.Boolean())]
    response = [(b"reports", amp.AmpList([
        (b"cluster", amp.Unicode()),
        (b"action", amp.Unicode()),
        (b"problems", amp.ListOf(amp.Unicode())),
    ]))]
    errors = {ControlFailed: b"CONTROL_FAILED"}


class Stop(amp.Command):
    arguments: list = []
    response: list = []


class Ping(amp.Command):
    """Ping a peer from one of the daemon's identities, over its link pool."""

    arguments = [
        (b"cluster", amp.Unicode()),
        (b"peer", amp.Unicode()),
        (b"addrs", amp.ListOf(amp.Unicode())),
    ]
    response = [(b"rtt", amp.Float()), (b"address", amp.Unicode()), (b"version", amp.Unicode())]
    errors = {ControlFailed: b"CONTROL_FAILED"}
