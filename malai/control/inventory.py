"""``Inventory`` on the control socket: the machines of a cluster with their heartbeats."""

from typing import Optional

from twisted.internet.defer import inlineCallbacks
from twisted.protocols import amp

from malai.control.commands import ControlFailed, Inventory, UnknownTarget
from malai.errors import MalaiError

__all__ = ["InventoryLocator"]


class InventoryLocator(amp.CommandLocator):
    """``Inventory`` for ``ControlProtocol``: the manager answers from its heartbeats, a member asks its manager."""

    @Inventory.responder
    @inlineCallbacks
    def inventory(self, cluster: str, machine: Optional[str] = None):
        from malai.peer.commands import ListMachines, NotAllowed

        try:
            svc = self.root.cluster(cluster)
        except MalaiError as e:
            raise UnknownTarget(str(e)) from None
        if svc.health is not None:
            records = svc.machine_records(only=machine)
        else:
            try:
                link = yield self.root.pool.get(svc.identity, svc.manager_id52())
                records = (yield link.callRemote(ListMachines, machine=machine))["machines"]
            except NotAllowed as e:
                raise ControlFailed(str(e)) from None
            except Exception as e:
                raise ControlFailed(f"cannot ask the manager of {cluster}: {str(e) or type(e).__name__}") from None
        if machine is not None and not records:
            raise UnknownTarget(f"cluster {cluster} has no machine {machine!r} that this device may reach")
        return {"machines": records}
