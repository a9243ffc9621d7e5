"""``MachineHealth`` (cluster manager): each machine's latest heartbeat and when it came.

Kept in memory and in ``clusters/<alias>/machines.json`` (written atomically, at most once per
``SAVE_EVERY`` seconds, and when the service stops), so a restarted manager still knows when it
last heard from each machine. A machine is online while its last heartbeat is at most
``MISSED`` intervals old.
"""

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from malai.atomic import write_atomic

__all__ = ["MISSED", "MachineHealth", "online"]

MISSED = 3  # heartbeats a machine may miss before it counts as offline
SAVE_EVERY = 5.0


def online(last_seen: float, interval: float, now: float) -> bool:
    return last_seen > 0 and now - last_seen <= MISSED * interval


class MachineHealth(Service):
    log = Logger()

    def __init__(self, reactor, path: Path):
        self.reactor = reactor
        self.path = Path(path)
        self.latest: Dict[str, dict] = {}  # machine ID52 -> its last heartbeat's fields and last_seen
        self._save_call: Optional[IDelayedCall] = None
        self.setName("health")

    def startService(self) -> None:
        super().startService()
        try:
            latest = json.loads(self.path.read_text())["machines"]
            if not isinstance(latest, dict) or not all(isinstance(v, dict) for v in latest.values()):
                raise ValueError("not a table of machines")
            self.latest = latest
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log.warn("{path} unreadable ({error}); machines count as unseen until they report",
                          path=self.path, error=e)

    def stopService(self):
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()
            self._save()
        return super().stopService()

    def record(self, id52: str, fields: dict) -> None:
        self.latest[id52] = {**fields, "last_seen": self.reactor.seconds()}
        if self._save_call is None or not self._save_call.active():
            self._save_call = self.reactor.callLater(SAVE_EVERY, self._save)

    def forget_all_but(self, id52s: Iterable[str]) -> None:
        """Drop machines no longer in the cluster."""
        keep = set(id52s)
        for id52 in set(self.latest) - keep:
            del self.latest[id52]

    def last_seen(self, id52: str) -> float:
        return self.latest.get(id52, {}).get("last_seen", 0.0)

    def _save(self) -> None:
        try:
            write_atomic(self.path, json.dumps({"machines": self.latest}, separators=(",", ":")).encode(), 0o600)
        except OSError as e:
            self.log.error("{path} not written: {error}", path=self.path, error=e)

    def records(self, machines: List[tuple], interval: int, sync: Dict[str, dict]) -> List[dict]:
        """``machines``: (name, ID52) pairs; ``sync``: the publisher's state by name."""
        now = self.reactor.seconds()
        out = []
        for name, id52 in machines:
            beat = self.latest.get(id52, {})
            seen = beat.get("last_seen", 0.0)
            state = sync.get(name, {})
            record = {"name": name, "id52": id52, "online": online(seen, interval, now), "last_seen": seen,
                      "heartbeat": interval, "sync": state.get("sync", "unknown"),
                      "config_version": beat.get("config_version", state.get("version", 0)),
                      "link": beat.get("link", ""), "rtt": beat.get("rtt")}
            record.update({k: v for k, v in beat.items() if k not in record and k != "last_seen"})
            out.append(record)
        return out
