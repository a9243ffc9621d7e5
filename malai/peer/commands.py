"""Every AMP command spoken between peers (signatures only; behaviour lives in responders).

Versioned by ``Hello``: the dialer sends it first, and nothing else is
answered until it has been. Values stay under AMP's 64 KiB limit. They ride on
the control stream of a multiplexed link; byte streams (exec, tcp, http, relay)
are streams of that link, opened as ``malai.peer.responders`` describes.
"""

from twisted.protocols import amp

__all__ = [
    "EXEC_ARGUMENTS", "PROTOCOL_VERSION", "Chunked", "ConfigHistory", "ConfigRefused", "GetConfig", "Hello",
    "IncompatibleVersion", "MACHINE_RECORD", "Heartbeat", "ListMachines", "NotAllowed", "Ping", "PushConfig",
    "PutConfig", "StaleBase", "inventory_arguments",
]

#: Bumped on any incompatible change to the commands below.
PROTOCOL_VERSION = 2  # 2: every link multiplexed (malai.peer.mux); streams are not AMP commands


class IncompatibleVersion(Exception):
    """The two sides speak different protocol versions."""


class NotAllowed(Exception):
    """The verified peer may not do this; the message says which rule decided."""


class ConfigRefused(Exception):
    """A config push or upload that was not accepted; the message says why."""





class StaleBase(Exception):
    """An upload whose base hash is no longer the current one."""


_CHUNK = 60000


class Chunked(amp.Argument):
    """``inner``'s encoding (text by default) of any size, split over keys ``name.0``, ``name.1``…
    with their count in ``name`` (AMP values stop at 64 KiB)."""

    def __init__(self, inner: amp.Argument = amp.Unicode()):
        super().__init__()
        self.inner = inner

    def toBox(self, name, strings, objects, proto):
        value = self.retrieve(objects, amp._wireNameToPythonIdentifier(name), proto)
        data = self.inner.toStringProto(value, proto)
        chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
        strings[name] = str(len(chunks)).encode()
        for i, chunk in enumerate(chunks):
            strings[name + b"." + str(i).encode()] = chunk

    def fromBox(self, name, strings, objects, proto):
        count = int(self.retrieve(strings, name, proto))
        parts = [strings.pop(name + b"." + str(i).encode()) for i in range(count)]
        objects[amp._wireNameToPythonIdentifier(name)] = self.inner.fromStringProto(b"".join(parts), proto)


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


class PushConfig(amp.Command):
    """Manager → machine: a signed personalized config (see malai.config.envelope)."""

    arguments = [
        (b"cluster", amp.Unicode()),
        (b"machine", amp.Unicode()),
        (b"version", amp.Integer()),
        (b"sha256", amp.Unicode()),
        (b"body", Chunked()),
        (b"signature", amp.String()),
    ]
    response = [(b"sha256", amp.Unicode())]
    errors = {ConfigRefused: b"CONFIG_REFUSED"}


class GetConfig(amp.Command):
    """Editor → manager: the current ``cluster.toml`` (or one from history)."""

    arguments = [(b"version", amp.Integer(optional=True))]
    response = [(b"body", Chunked()), (b"sha256", amp.Unicode()), (b"version", amp.Integer())]
    errors = {NotAllowed: b"NOT_ALLOWED", ConfigRefused: b"CONFIG_REFUSED"}


class PutConfig(amp.Command):
    """Editor → manager: a new ``cluster.toml``, accepted only if ``base`` is still current."""

    arguments = [(b"body", Chunked()), (b"base", amp.Unicode(optional=True)), (b"force", amp.Boolean())]
    response = [(b"sha256", amp.Unicode()), (b"version", amp.Integer())]
    errors = {NotAllowed: b"NOT_ALLOWED", ConfigRefused: b"CONFIG_REFUSED", StaleBase: b"STALE_BASE"}


class ConfigHistory(amp.Command):
    arguments: list = []
    response = [(b"versions", amp.AmpList([
        (b"version", amp.Integer()), (b"sha256", amp.Unicode()), (b"time", amp.Float()),
        (b"by", amp.Unicode(optional=True)),
    ]))]
    errors = {NotAllowed: b"NOT_ALLOWED"}


#: What an exec request says on the control socket (on a peer link: ``malai.peer.exec_header``).
EXEC_ARGUMENTS = [
    (b"argv", amp.ListOf(amp.Unicode())),
    (b"tty", amp.Boolean()),
    (b"term", amp.Unicode()),
    (b"rows", amp.Integer()),
    (b"cols", amp.Integer()),
    (b"timeout", amp.Float(optional=True)),
    (b"line", amp.Unicode(optional=True)),  # instead of argv: ssh's command string (malai ssh)
    (b"subsystem", amp.Unicode(optional=True)),  # instead of argv: ``sftp`` (malai ssh -s)
]


# -- observability (malai.peer.heartbeat answers these on the manager) ---------------------------

def inventory_arguments(optional: bool = False) -> list:
    """What a machine runs on (see malai.inventory); ``optional`` in a listing, where a machine
    not heard from yet has none."""
    text, integer, number = (lambda: amp.Unicode(optional=optional), lambda: amp.Integer(optional=optional),
                             lambda: amp.Float(optional=optional))
    return [
        (b"version", text()), (b"os", text()), (b"kernel", text()), (b"hostname", text()),
        (b"cpus", integer()), (b"load", amp.ListOf(amp.Float(), optional=optional)),
        (b"memory_total", integer()), (b"memory_used", integer()),
        (b"disk_total", integer()), (b"disk_used", integer()),
        (b"uptime", number()), (b"rss", integer()), (b"fds", integer()),
        (b"paths", amp.ListOf(amp.Unicode(), optional=optional)),
    ]


class Heartbeat(amp.Command):
    """Machine → its manager, over the link the machine keeps: alive, with its inventory, its
    config version, the hint its link took and the round trip of its previous heartbeat."""

    arguments = [*inventory_arguments(), (b"config_version", amp.Integer()), (b"link", amp.Unicode()),
                 (b"rtt", amp.Float(optional=True))]
    response: list = []
    errors = {NotAllowed: b"NOT_ALLOWED"}


#: One machine as its manager knows it; the inventory is absent until its first heartbeat.
MACHINE_RECORD = [
    (b"name", amp.Unicode()), (b"id52", amp.Unicode()), (b"online", amp.Boolean()), (b"last_seen", amp.Float()),
    (b"heartbeat", amp.Integer()), (b"config_version", amp.Integer()), (b"sync", amp.Unicode()),
    (b"link", amp.Unicode()), (b"rtt", amp.Float(optional=True)), *inventory_arguments(optional=True),
]


class ListMachines(amp.Command):
    """Member → manager: the machines the caller may reach (``machine``: that one only)."""

    arguments = [(b"machine", amp.Unicode(optional=True))]
    response = [(b"machines", Chunked(amp.AmpList(MACHINE_RECORD)))]
    errors = {NotAllowed: b"NOT_ALLOWED"}


# -- joining with an invite (malai.peer.joining answers it on the manager) ---------------------------
__all__ += ["JoinCluster", "JoinRefused"]


class JoinRefused(Exception):
    """The invite secret is unknown, used, expired or revoked, or the machine could not be added."""


class JoinCluster(amp.Command):
    """New device → manager, over a link from an identity the manager does not know yet: the
    invite's secret. The manager adds the caller's ID52 as the invited machine and answers with
    the machine's name and the cluster's."""

    arguments = [(b"secret", amp.Unicode())]
    response = [(b"name", amp.Unicode()), (b"cluster", amp.Unicode())]
    errors = {JoinRefused: b"JOIN_REFUSED"}
