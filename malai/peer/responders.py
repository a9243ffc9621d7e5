"""What a verified peer may ask of a cluster: config push (to machines) and config editing
(on the manager) as AMP commands on a link's control stream (``ClusterResponder``); remote
commands, forwarded services and relaying as streams of the link (``StreamResponder``).
Every request is authorised here against the link's verified peer ID52; the cluster
service does the work."""

from twisted.logger import Logger

from malai.acl import Denied
from malai.config.envelope import Envelope
from malai.config.errors import ConfigError
from malai.config.store import HashMismatch, Refusal
from malai.errors import MalaiError
from malai.p2p.link import PeerAddress
from malai.peer import exec_header
from malai.peer.commands import ConfigHistory, ConfigRefused, GetConfig, NotAllowed, PushConfig, PutConfig, StaleBase
from malai.peer.execution import BadRequest, ExecSession, caller_name, prepare
from malai.peer.heartbeat import HeartbeatLocator
from malai.peer.http_headers import Caller
from malai.peer.http_proxy import HttpSession
from malai.peer.streams import StreamRefused, StreamRequest
from malai.peer.upstream import authorise, open_tcp

__all__ = ["ClusterResponder", "StreamResponder"]

HISTORY_SHOWN = 200  # the latest versions: what one AMP value (64 KiB) holds with room to spare


class ClusterResponder(HeartbeatLocator):  # heartbeats: malai.peer.heartbeat
    log = Logger()

    def __init__(self, cluster, peer: PeerAddress):
        self.cluster = cluster  # a ClusterService
        self.peer = peer

    @PushConfig.responder
    def push_config(self, cluster, machine, version, sha256, body, signature):
        envelope = Envelope(cluster, machine, version, sha256, body, signature)
        try:
            return {"sha256": self.cluster.accept_push(envelope, self.peer.peer)}
        except MalaiError as e:
            self.log.warn("refused config push from {peer}: {reason}", peer=self.peer.peer, reason=e)
            raise ConfigRefused(str(e)) from None

    def _store(self, action: str):
        """The config store, if this peer may edit this cluster's config."""
        decision = self.cluster.may_edit_config(self.peer.peer)
        if not decision:
            self.log.warn("denied {action} to {peer}: {why}", action=action, peer=self.peer.peer, why=decision)
            raise NotAllowed(f"{action}: {decision.for_caller()}")
        return self.cluster.store

    @GetConfig.responder
    def get_config(self, version=None):
        store = self._store("config download")
        try:
            rev = store.current() if version is None else store.revision(version)
        except MalaiError as e:
            raise self._refused("config download", e) from None
        return {"body": rev.text, "sha256": rev.sha256, "version": rev.version}

    @PutConfig.responder
    def put_config(self, body, force, base=None):
        store = self._store("config upload")
        try:
            rev = store.upload(body, base, force, by=self.peer.peer)
        except HashMismatch as e:
            raise StaleBase(str(e)) from None
        except ConfigError as e:
            raise ConfigRefused("the uploaded cluster.toml is not valid:\n" + str(e)) from None
        except MalaiError as e:
            raise self._refused("config upload", e) from None
        self.log.info("{peer} uploaded cluster.toml version {version}", peer=self.peer.peer, version=rev.version)
        self.cluster.config_changed()
        return {"sha256": rev.sha256, "version": rev.version}

    def _refused(self, action: str, error: MalaiError) -> ConfigRefused:
        """The editor gets a reason that names no path of ours; the whole error goes to the log."""
        self.log.warn("{action} for {peer} refused: {error}", action=action, peer=self.peer.peer, error=error)
        return ConfigRefused(str(error) if isinstance(error, Refusal) else f"{action} failed on the manager; "
                             "its log says why")

    @ConfigHistory.responder
    def history(self):
        return {"versions": self._store("config history").history()[-HISTORY_SHOWN:]}


class StreamResponder:
    """Answers the streams a verified peer opens on a link, by kind:

    - ``exec`` (target: the cluster; header ``malai-exec``, see ``malai.peer.exec_header``):
      a command, its session speaking exec frames (``malai.frames``);
    - ``tcp`` / ``http`` (target: the service name): the service's upstream, as bytes;
    - ``relay`` (target: an ID52), on a relay: a stream spliced to that member over the
      link it keeps here, carrying the caller's own TLS link with it;
    - ``relayed`` (target: the caller's ID52), from a relay: that caller's TLS link.

    Each is authorised against the verified peer before the stream is accepted; a
    refusal is a ``StreamRefused`` whose code (``NOT_ALLOWED``, ``EXEC_FAILED``,
    ``UPSTREAM_FAILED``, ``RELAY_REFUSED``, ``BAD_REQUEST``) and reason the opener sees.
    """

    log = Logger()

    def __init__(self, cluster):
        self.cluster = cluster  # a ClusterService

    def __call__(self, request: StreamRequest):
        answer = self._kinds.get(request.kind)
        if answer is None:
            raise StreamRefused(f"this machine opens no {request.kind!r} streams; exec, tcp, http or relay",
                                "BAD_REQUEST")
        return answer(self, request)

    def exec(self, request: StreamRequest) -> ExecSession:
        cluster, caller = self.cluster, request.peer.peer
        try:
            fields = exec_header.decode(dict(request.headers))
        except ValueError as e:
            fields, problem = None, BadRequest(f"invalid request: {e}")
        else:
            problem = None
        asked = _asked(fields)
        try:
            if problem is not None:
                raise problem
            exec_request = prepare(cluster.entry.machine, cluster.name, caller, **fields)
        except BadRequest as e:
            cluster.audit.record(cluster=cluster.name, caller=caller, argv=asked, decision="invalid", rule=str(e))
            self.log.warn("{cluster}: {caller} sent an invalid exec request: {why}", cluster=cluster.name,
                          caller=caller, why=e)
            raise StreamRefused(str(e), "BAD_REQUEST") from None
        except Denied as e:
            cluster.audit.record(cluster=cluster.name, caller=caller, argv=asked, decision="denied",
                                 rule=str(e.decision))
            self.log.warn("{cluster}: {caller} denied {argv}: {why}", cluster=cluster.name, caller=caller,
                          argv=asked, why=e.decision)
            raise StreamRefused(e.for_caller(), "NOT_ALLOWED") from None
        except MalaiError as e:
            cluster.audit.record(cluster=cluster.name, caller=caller, argv=asked, decision="failed", rule=str(e))
            raise StreamRefused(str(e), "EXEC_FAILED") from None
        return ExecSession(cluster.daemon.reactor, exec_request, cluster.audit)

    def service(self, request: StreamRequest):
        cluster, caller, kind, service = self.cluster, request.peer.peer, request.kind, request.target
        config = cluster.entry.machine
        name = caller_name(config, caller) if config is not None else ""
        try:
            target, decision = authorise(config, caller, kind, service)
        except Denied as e:
            cluster.audit.record(cluster=cluster.name, caller=caller, name=name, **{kind: service},
                                 decision="denied", rule=str(e.decision))
            self.log.warn("{cluster}: {caller} denied {kind}.{service}: {why}", cluster=cluster.name,
                          caller=name or caller, kind=kind, service=service, why=e.decision)
            raise StreamRefused(e.for_caller(), "NOT_ALLOWED") from None
        if kind == "tcp":
            return open_tcp(cluster.daemon.reactor, target, decision, request.peer, name, cluster.name,
                            cluster.audit)
        who = Caller(caller, name, config.manager.cluster_name, getattr(request.peer.address, "host", ""))
        return HttpSession(cluster.daemon.reactor, target, who, cluster.daemon.http_upstreams, cluster.audit,
                           str(decision))

    def relay(self, request: StreamRequest):
        cluster, caller = self.cluster, request.peer.peer
        if caller not in cluster.members() and caller != cluster.manager_id52():
            self.log.warn("{cluster}: refused to relay for {caller}: not a member", cluster=cluster.name,
                          caller=caller)
            raise StreamRefused("only members of this cluster may use its relay", "RELAY_REFUSED")
        return cluster.relay_open(caller, request.target)

    def relayed(self, request: StreamRequest):
        return self.cluster.relayed(request.peer.peer, request.target)

    _kinds = {"exec": exec, "tcp": service, "http": service, "relay": relay, "relayed": relayed}


def _asked(fields) -> list:
    """What the caller asked to run, for the audit."""
    if fields is None:
        return []
    if fields["line"] is not None:
        return [fields["line"]]
    if fields["subsystem"] is not None:
        return ["-s", fields["subsystem"]]
    return fields["argv"]
