"""``LinkKeeper``: keeps one link up, as an Automat state machine.

A machine keeps links to its manager and relays so they can reach it even
when nobody can dial it. The keeper dials, probes the link every ``heartbeat``
seconds (a ping, or to the manager a heartbeat with the machine's inventory),
and re-dials with backoff when the link drops or a dial fails::

    idle --start--> waiting --tick--> checking --up--> linked --tick/hurry--> checking …
                       ^                  |               |
                       +------down--------+<-----lost-----+
    (any) --stop--> stopped
"""

from typing import Callable, Optional

from automat import MethodicalMachine
from twisted.logger import Logger

from malai.peer.ping import ping

__all__ = ["RETRY_FIRST", "RETRY_MAX", "LinkKeeper"]

#: Re-dial after 1 s, doubling up to 5 s: a manager back from a restart is linked again within 5 s.
RETRY_FIRST, RETRY_MAX = 1.0, 5.0


class LinkKeeper:
    machine = MethodicalMachine()
    log = Logger()

    def __init__(self, reactor, cluster, pool, peer: str, label: str, heartbeat: float,
                 probe: Optional[Callable] = None):
        """``probe(link)`` returns a Deferred that fires when the peer answered (default: a ping)."""
        self.reactor, self.cluster, self.pool = reactor, cluster, pool
        self.peer, self.label, self.heartbeat = peer, label, heartbeat
        self.probe = probe if probe is not None else ping
        self.rtt: Optional[float] = None  # seconds the last probe took
        self.link = None
        self.problem = ""  # why the last dial or probe failed; "" once linked
        self._call = None
        self._delay = RETRY_FIRST

    # -- states -----------------------------------------------------------------
    @machine.state(initial=True)
    def idle(self):
        """Not started."""

    @machine.state()
    def waiting(self):
        """A dial is scheduled (at once, or after a backoff)."""

    @machine.state()
    def checking(self):
        """Getting the link from the pool (dialing if needed) and pinging over it."""

    @machine.state()
    def linked(self):
        """The link answered; the next heartbeat is scheduled."""

    @machine.state()
    def stopped(self):
        """Stopped for good."""

    # -- inputs -----------------------------------------------------------------
    @machine.input()
    def start(self):
        "The agent started."

    @machine.input()
    def tick(self):
        "The scheduled time came."

    @machine.input()
    def up(self, link):
        "The link answered a ping."

    @machine.input()
    def hurry(self):
        "Something to report: probe now rather than at the next heartbeat."

    @machine.input()
    def down(self, reason: str):
        "Dialing or pinging failed."

    @machine.input()
    def lost(self, link):
        "A link closed."

    @machine.input()
    def stop(self):
        "The agent stops, or no longer needs this link."

    # -- outputs ----------------------------------------------------------------
    @machine.output()
    def _dial_now(self):
        self._schedule(0)

    @machine.output()
    def _check(self):
        self._cancel_timer()  # a hurry comes before the scheduled tick
        d = self.pool.get(self.cluster.identity, self.peer)
        d.addCallback(self._probe)
        d.addCallbacks(self.up, lambda failure: self.down(failure.getErrorMessage()))

    def _probe(self, link):
        started = self.reactor.seconds()

        def answered(_):
            self.rtt = self.reactor.seconds() - started
            return link

        return self.probe(link).addCallback(answered)

    @machine.output()
    def _note_link(self, link):
        if link is not self.link:
            self.link = link
            self.log.info("{cluster}: linked to {label} via {hint}", cluster=self.cluster.name, label=self.label,
                          hint=link.peer.hint or "its link")
            link.closed.addCallback(self._closed)
        self._delay = RETRY_FIRST
        self.problem = ""
        self._schedule(self.heartbeat)

    @machine.output()
    def _back_off(self, reason: str):
        self.problem = reason
        self.log.info("{cluster}: {label} unreachable ({reason}); retrying in {delay:g}s", cluster=self.cluster.name,
                      label=self.label, reason=reason, delay=self._delay)
        self._retry_later()

    @machine.output()
    def _forget(self, link):
        if link is self.link:
            self.link = None
            self.problem = "the link closed"
            self.log.warn("{cluster}: lost the link to {label}; re-dialing in {delay:g}s", cluster=self.cluster.name,
                          label=self.label, delay=self._delay)
            self._retry_later()

    @machine.output()
    def _cancel(self):
        self._cancel_timer()

    def _closed(self, link):
        self.lost(link)
        return link  # for the observers after us

    def _retry_later(self) -> None:
        self._schedule(self._delay)
        self._delay = min(self._delay * 2, RETRY_MAX)

    def _cancel_timer(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        self._call = self.reactor.callLater(delay, self.tick)

    # -- transitions --------------------------------------------------------------
    idle.upon(start, enter=waiting, outputs=[_dial_now])
    waiting.upon(tick, enter=checking, outputs=[_check])
    checking.upon(up, enter=linked, outputs=[_note_link])
    checking.upon(down, enter=waiting, outputs=[_back_off])
    linked.upon(tick, enter=checking, outputs=[_check])
    linked.upon(hurry, enter=checking, outputs=[_check])
    for _state in (idle, waiting, checking, stopped):
        _state.upon(hurry, enter=_state, outputs=[])  # a probe is due or under way anyway
    linked.upon(lost, enter=waiting, outputs=[_forget])
    for _state in (idle, waiting, checking):
        _state.upon(lost, enter=_state, outputs=[])  # an old link; the next check finds out
    for _state in (idle, waiting, checking, linked, stopped):
        _state.upon(stop, enter=stopped, outputs=[_cancel])
    for _input in (tick, up, down, lost):
        stopped.upon(_input, enter=stopped, outputs=[])  # late events after a stop
    del _state, _input
