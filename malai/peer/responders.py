"""What a verified peer may ask of a cluster: config push and remote commands
(to machines), config editing (on the manager). Every request is authorised here against
the link's verified peer ID52; the cluster service does the work."""

from twisted.logger import Logger

from malai.acl import Denied
from malai.config.envelope import Envelope
from malai.config.errors import ConfigError
from malai.config.store import HashMismatch, Refusal
from malai.errors import MalaiError
from malai.p2p.link import PeerAddress
from malai.peer.commands import (
    ConfigHistory,
    ConfigRefused,
    ExecFailed,
    GetConfig,
    NotAllowed,
    OpenExec,
    OpenStream,
    PushConfig,
    PutConfig,
    RelayAttach,
    RelayOpen,
    RelayRefused,
    RelayRequest,
    StaleBase,
)
from malai.peer.execution import BadRequest, ExecSession, caller_name, prepare
from malai.peer.heartbeat import HeartbeatLocator
from malai.peer.http_headers import Caller
from malai.peer.http_proxy import HttpSession
from malai.peer.upstream import authorise, open_tcp

__all__ = ["ClusterResponder"]

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

    @OpenExec.responder
    def open_exec(self, argv, tty, term, rows, cols, timeout=None, line=None, subsystem=None):
        cluster, caller = self.cluster, self.peer.peer
        asked = [line] if line is not None else ["-s", subsystem] if subsystem is not None else argv  # for the audit
        try:
            request = prepare(cluster.entry.machine, cluster.name, caller, argv, tty, term, rows, cols, timeout,
                              line, subsystem)
        except BadRequest as e:
            cluster.audit.record(cluster=cluster.name, caller=caller, argv=asked, decision="invalid", rule=str(e))
            self.log.warn("{cluster}: {caller} sent an invalid exec request ({why}): tty={tty} rows={rows} "
                          "cols={cols} timeout={timeout}", cluster=cluster.name, caller=caller, why=e, tty=tty,
                          rows=rows, cols=cols, timeout=timeout)
            raise ExecFailed(str(e)) from None
        except Denied as e:
            cluster.audit.record(cluster=cluster.name, caller=caller, argv=asked, decision="denied",
                                 rule=str(e.decision))
            self.log.warn("{cluster}: {caller} denied {argv}: {why}", cluster=cluster.name, caller=caller,
                          argv=asked, why=e.decision)
            raise NotAllowed(e.for_caller()) from None
        except MalaiError as e:
            cluster.audit.record(cluster=cluster.name, caller=caller, argv=asked, decision="failed", rule=str(e))
            raise ExecFailed(str(e)) from None
        return ExecSession(cluster.daemon.reactor, request, cluster.audit)

    @OpenStream.responder
    def open_stream(self, kind, service):
        cluster, caller = self.cluster, self.peer.peer
        config = cluster.entry.machine
        name = caller_name(config, caller) if config is not None else ""
        try:
            target, decision = authorise(config, caller, kind, service)
        except Denied as e:
            cluster.audit.record(cluster=cluster.name, caller=caller, name=name, **{kind: service},
                                 decision="denied", rule=str(e.decision))
            self.log.warn("{cluster}: {caller} denied {kind}.{service}: {why}", cluster=cluster.name,
                          caller=name or caller, kind=kind, service=service, why=e.decision)
            raise NotAllowed(e.for_caller()) from None
        if kind == "tcp":
            return open_tcp(cluster.daemon.reactor, target, decision, self.peer, name, cluster.name, cluster.audit)
        who = Caller(caller, name, config.manager.cluster_name, getattr(self.peer.address, "host", ""))
        return HttpSession(cluster.daemon.reactor, target, who, cluster.daemon.http_upstreams, cluster.audit,
                           str(decision))

    _relay_asked = False  # a link asks for one relayed stream (RelayOpen or RelayAttach), once

    def _relay_once(self) -> None:
        if self._relay_asked:
            raise RelayRefused("this link already asked for a relayed stream; open a link per stream")
        self._relay_asked = True

    @RelayOpen.responder
    def relay_open(self, target):
        cluster, caller = self.cluster, self.peer.peer
        if caller not in cluster.members() and caller != cluster.manager_id52():
            self.log.warn("{cluster}: refused to relay for {caller}: not a member", cluster=cluster.name,
                          caller=caller)
            raise RelayRefused("only members of this cluster may use its relay")
        self._relay_once()
        return cluster.relay_open(caller, target)

    @RelayAttach.responder
    def relay_attach(self, token):
        self._relay_once()
        return self.cluster.relayer().attach(token, self.peer.peer)

    @RelayRequest.responder
    def relay_request(self, token):
        self.cluster.relay_request(self.peer.peer, token)
        return {}

    @ConfigHistory.responder
    def history(self):
        return {"versions": self._store("config history").history()[-HISTORY_SHOWN:]}
