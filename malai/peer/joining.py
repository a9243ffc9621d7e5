"""What a stranger may ask of a cluster manager: ``JoinCluster``, and nothing else.

A device the manager does not know yet gets a link only while the cluster has an invite pending
(``ClusterService.admits``); on that link this locator answers ``JoinCluster`` alone (any other
command gets AMP's "unhandled command" error, and nothing of the cluster is touched). A secret that
matches a pending, unexpired invite adds the caller's verified ID52 to ``cluster.toml`` as the
invited machine, as a new config version, and the invite is gone; a wrong secret is refused and
logged. The link's idle timeout and the handshake limits bound what a stranger can hold open.
"""

from twisted.logger import Logger
from twisted.protocols import amp

from malai.config.errors import ConfigError
from malai.config.invites import InviteRefused, InviteStore, add_machine
from malai.errors import MalaiError
from malai.p2p.link import PeerAddress
from malai.peer.commands import JoinCluster, JoinRefused

__all__ = ["JoinLocator"]


class JoinLocator(amp.CommandLocator):
    log = Logger()

    def __init__(self, cluster, peer: PeerAddress):
        self.cluster = cluster  # a ClusterService on the manager
        self.peer = peer

    @JoinCluster.responder
    def join(self, secret: str):
        cluster, caller = self.cluster, self.peer.peer
        if cluster.entry.cluster is None:
            raise JoinRefused(f"this device does not manage {cluster.name}")
        if cluster.knows(caller):
            raise JoinRefused(f"{caller} is a member of {cluster.name} already")
        try:
            invite = InviteStore(cluster.entry.path).redeem(secret)
        except InviteRefused as e:
            self.log.warn("{cluster}: refused a join from {caller} at {address}: {why}", cluster=cluster.name,
                          caller=caller, address=getattr(self.peer.address, "host", "?"), why=e)
            raise JoinRefused(str(e)) from None
        store = cluster.store
        try:
            current = store.current()
            text = add_machine(current.text, invite.name, caller, invite)
            store.upload(text, current.sha256, by=f"invite {invite.id} ({caller})")
        except (MalaiError, ConfigError) as e:
            self.log.warn("{cluster}: invite {id} for {name} was valid but {caller} could not be added: {why}",
                          cluster=cluster.name, id=invite.id, name=invite.name, caller=caller, why=e)
            raise JoinRefused(f"the invite was valid but the manager could not add {invite.name!r}: "
                              "its log says why; ask for a new invite") from None
        self.log.info("{cluster}: {caller} joined as {name} with invite {id}", cluster=cluster.name, caller=caller,
                      name=invite.name, id=invite.id)
        cluster.config_changed()
        return {"name": invite.name, "cluster": cluster.entry.cluster.manager.cluster_name}
