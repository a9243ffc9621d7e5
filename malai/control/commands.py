"""AMP commands of the control socket (``$MALAI_HOME/malai.socket``): signatures only."""

from twisted.protocols import amp

from malai.peer.commands import EXEC_ARGUMENTS, MACHINE_RECORD, Chunked

__all__ = ["SUMMARY_LISTS", "ControlFailed", "Exec", "ExecDenied", "Machines", "Ping", "Rescan", "Status", "Stop", "UnknownTarget",
           "Unreachable"]


class ControlFailed(Exception):
    """A command the daemon could not carry out; the message says why and what to do."""


class ExecDenied(Exception):
    """The machine refused the command (exit 126)."""


class UnknownTarget(Exception):
    """No such cluster or machine (exit 2)."""


class Unreachable(Exception):
    """No link to the machine (exit 255)."""


#: With ``summary``, Status lists at most this many of a manager's machines (the laggards) and links.
SUMMARY_LISTS = 10


class Status(amp.Command):
    arguments = [(b"summary", amp.Boolean(optional=True))]
    response = [
        (b"pid", amp.Integer()),
        (b"version", amp.Unicode()),
        (b"uptime", amp.Float()),
        (b"listen", Chunked(amp.ListOf(amp.Unicode()))),
        (b"clusters", Chunked(amp.AmpList([
            (b"cluster", amp.Unicode()),
            (b"role", amp.Unicode()),
            (b"id52", amp.Unicode()),
            (b"machines", amp.Integer()),
            (b"waiting_for_config", amp.Boolean()),
            (b"manager_problem", amp.Unicode(optional=True)),  # a machine: why it has no link to its manager
            (b"config_version", amp.Integer()),
            (b"publishing", amp.Boolean()),  # the manager is still making the configs of its last rescan
            (b"in_sync", amp.Integer()),
            (b"pending", amp.Integer()),
            (b"failing", amp.Integer()),
            (b"links", amp.Integer()),
            (b"peer_links", Chunked(amp.AmpList([(b"peer", amp.Unicode()), (b"path", amp.Unicode()),
                                                 (b"rtt", amp.Float(optional=True)),
                                                 (b"streams", amp.Integer(optional=True))]))),
            (b"sync", Chunked(amp.AmpList([
                (b"machine", amp.Unicode()),
                (b"version", amp.Integer()),
                (b"sync", amp.Unicode()),
                (b"last_seen", amp.Float()),
                (b"error", amp.Unicode()),
            ]))),
        ]))),
        (b"forwards", Chunked(amp.AmpList([
            (b"name", amp.Unicode()),
            (b"local", amp.Unicode()),
            (b"remote", amp.Unicode()),
            (b"active", amp.Integer()),
            (b"total", amp.Integer()),
        ]))),
        (b"http", amp.Unicode(optional=True)),  # where the HTTP front listens
        (b"http_urls", Chunked(amp.ListOf(amp.Unicode()))),
        (b"relay_active", amp.Integer()),  # streams this daemon relays for others (a manager)
        (b"relay_total", amp.Integer()),
        (b"relay_bytes", amp.Integer()),
        (b"tor", amp.Unicode()),  # off, connecting, running, failed: …
        (b"onions", Chunked(amp.ListOf(amp.Unicode()))),  # the onion services up, one per identity
        (b"lan_discovery", amp.Unicode(optional=True)),  # on, starting, off[: why] (malai.services.discovery)
        (b"lan_announced", amp.Integer(optional=True)),  # identities announced on the LAN
        (b"lan_seen", amp.Integer(optional=True)),  # announcements heard from the LAN
    ]


class Rescan(amp.Command):
    arguments = [(b"cluster", amp.Unicode(optional=True)), (b"check", amp.Boolean())]
    response = [(b"reports", Chunked(amp.AmpList([
        (b"cluster", amp.Unicode()),
        (b"action", amp.Unicode()),
        (b"problems", Chunked(amp.ListOf(amp.Unicode()))),
    ])))]
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


class Exec(amp.ProtocolSwitchCommand):
    """Run a command on a machine; on the answer this connection carries exec frames (malai.frames).

    Built by hand in malai/cli/remote.py (the stdlib client): keep the two in step."""

    arguments = [(b"cluster", amp.Unicode()), (b"machine", amp.Unicode()), *EXEC_ARGUMENTS]
    response: list = []
    errors = {ExecDenied: b"DENIED", UnknownTarget: b"UNKNOWN", Unreachable: b"UNREACHABLE",
              ControlFailed: b"FAILED"}


class Machines(amp.Command):
    """The machines of a cluster this device may run commands on (for fan-out)."""

    arguments = [(b"cluster", amp.Unicode())]
    response = [(b"machines", Chunked(amp.ListOf(amp.Unicode())))]  # read by malai/cli/remote.py too
    errors = {UnknownTarget: b"UNKNOWN"}


class Inventory(amp.Command):
    """Machines of a cluster with heartbeat and inventory: on the manager all of them (or ``machine``),
    on a member those it may reach, as its manager answers."""

    arguments = [(b"cluster", amp.Unicode()), (b"machine", amp.Unicode(optional=True))]
    response = [(b"machines", Chunked(amp.AmpList(MACHINE_RECORD)))]
    errors = {UnknownTarget: b"UNKNOWN", ControlFailed: b"CONTROL_FAILED"}


__all__ += ["Inventory"]
