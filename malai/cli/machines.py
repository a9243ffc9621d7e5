"""``malai machines CLUSTER [MACHINE] [--json]``: who is up, what they run on, how they are reached."""

import time
from typing import Optional

from malai.cli.common import home_of, print_json, run_twisted
from malai.errors import MalaiError, UsageError

__all__ = ["INVENTORY_KEYS", "add_parser"]

#: What ``--json`` puts under ``inventory``; the other keys of a machine sit at the top.
INVENTORY_KEYS = ("os", "kernel", "hostname", "cpus", "load", "memory_total", "memory_used", "disk_total",
                  "disk_used", "uptime", "rss", "fds", "paths")


def add_parser(sub) -> None:
    p = sub.add_parser("machines", help="the machines of a cluster: online or not, version, inventory",
                       description="On the manager every machine of CLUSTER, on a member those it may reach (its "
                                   "manager answers): online (a heartbeat within three intervals) or offline, last "
                                   "seen, malai version, config version in sync or not, the path of its link to the "
                                   "manager and its round trip. With MACHINE, that one in full. Needs the daemon.")
    p.add_argument("cluster")
    p.add_argument("machine", nargs="?")
    p.add_argument("--json", action="store_true",
                   help="print a list of objects: name, id52, online, last_seen, version, inventory, …")
    p.set_defaults(run=run)


async def _ask(reactor, socket, cluster: str, machine: Optional[str]) -> list:
    from malai.control.client import call
    from malai.control.commands import Inventory, UnknownTarget

    try:
        answer = await call(reactor, socket, Inventory, cluster=cluster, machine=machine)
    except UnknownTarget as e:
        raise UsageError(str(e)) from None
    return [{k: v for k, v in r.items() if v is not None} for r in answer["machines"]]  # None: never reported


def as_json(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in INVENTORY_KEYS}
    out["last_seen"] = record["last_seen"] or None
    out.setdefault("version", None)
    out["inventory"] = {k: record[k] for k in INVENTORY_KEYS if k in record}
    return out


def run(args) -> int:
    home = home_of(args)
    from malai.lock import DaemonLock

    if not DaemonLock(home.lock).holder() and not home.socket.exists():
        raise MalaiError("the daemon is not running: start it with `malai daemon`")
    records = run_twisted(_ask, home.socket, args.cluster, args.machine)
    if args.json:
        print_json([as_json(r) for r in records])
    elif args.machine:
        _print_one(records[0])
    elif not records:
        print(f"no machines in {args.cluster} that this device may reach")
    else:
        for r in records:
            print(f"{r['name']:<16} {_state(r):<8} {_seen(r):<18} malai {r.get('version', '?'):<8} "
                  f"config {r['config_version']} {r['sync']:<8} {_path(r)}")
    return 0


def _state(r: dict) -> str:
    return "online" if r["online"] else "offline"


def _seen(r: dict) -> str:
    return f"seen {_ago(r['last_seen'])} ago" if r["last_seen"] else "never seen"


def _path(r: dict) -> str:
    if not r["link"]:
        return ""
    rtt = f", {r['rtt'] * 1000:.1f} ms" if r.get("rtt") is not None else ""
    return f"via {r['link']}{rtt}"


def _ago(when: float) -> str:
    s = max(0, int(time.time() - when))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"


def _print_one(r: dict) -> None:
    print(f"{r['name']} {r['id52']}")
    print(f"  state     {_state(r)}, {_seen(r)} (a heartbeat every {r['heartbeat']}s)")
    print(f"  config    version {r['config_version']}, {r['sync']}")
    if "version" not in r:
        print("  no heartbeat received yet: no inventory")
        return
    print(f"  malai     {r['version']}")
    print(f"  system    {r['os']}, kernel {r['kernel']}, hostname {r['hostname']}, up {_ago(time.time() - r['uptime'])}")
    print(f"  cpus      {r['cpus']}, load {' '.join(f'{x:.2f}' for x in r['load'])}")
    print(f"  memory    {_size(r['memory_used'])} used of {_size(r['memory_total'])}")
    print(f"  disk      {_size(r['disk_used'])} used of {_size(r['disk_total'])}")
    print(f"  daemon    RSS {_size(r['rss'])}, {r['fds']} open descriptors")
    print(f"  link      {_path(r) or 'none'}")
    print(f"  reachable {', '.join(r['paths']) or 'only through its links'}")
