"""``malai machine init``: join a cluster as a machine."""

import socket

from malai.atomic import write_atomic
from malai.cli.common import home_of
from malai.config.cluster_info import render_cluster_info
from malai.config.models import ClusterInfo
from malai.config.reader import check_addr, check_name
from malai.errors import UsageError
from malai.identity import ID52Error, parse_id52


def add_parser(sub) -> None:
    p = sub.add_parser("machine", help="join clusters as a machine")
    msub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = msub.add_parser(
        "init", help="create this device's identity in a cluster",
        description="Create clusters/<alias>/machine.private-key and cluster-info.toml, then print the "
                    "[machine.NAME] snippet to add to the cluster manager's cluster.toml.")
    init.add_argument("manager", metavar="CM-ID52", help="the cluster manager's ID52")
    init.add_argument("alias", help="local name for the cluster")
    init.add_argument("--addr", action="append", default=[], metavar="HOST:PORT",
                      help="where the cluster manager listens (repeatable)")
    init.add_argument("--name", help="this machine's name in the cluster (default: the host name)")
    init.set_defaults(run=run_init)
    from malai.cli.invite import add_join_parser

    add_join_parser(msub)


def _default_name() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return name if not check_name(name) else "machine"


def run_init(args) -> int:
    try:
        manager = parse_id52(args.manager)
    except ID52Error as e:
        raise UsageError(f"CM-ID52: {e}") from None
    for value, what in [(args.alias, "alias")] + ([(args.name, "--name")] if args.name else []):
        error = check_name(value)
        if error:
            raise UsageError(f"{what}: {error}")
    for addr in args.addr:
        error = check_addr(addr)
        if error:
            raise UsageError(f"--addr: {error}")
    home = home_of(args)
    if (home.cluster_dir(args.alias) / "cluster-info.toml").exists():
        return _update(home, args, manager)
    name = args.name or _default_name()
    folder, identity = home.new_cluster(args.alias, "machine.private-key")
    info = ClusterInfo(args.alias, manager, tuple(args.addr), name)
    write_atomic(folder / "cluster-info.toml", render_cluster_info(info).encode())
    print(f"Joined cluster {args.alias!r} as machine {name!r}; waiting for its first config.")
    print(f"  machine ID52: {identity.id52}")
    print(f"Add this to the cluster manager's cluster.toml, then run `malai rescan {args.alias}` there:")
    print()
    print(f"[machine.{name}]")
    print(f'id52 = "{identity.id52}"')
    print('# allow_from = "admins"')
    from malai.cli.rescan import notify_daemon

    notify_daemon(home, args.alias)
    return 0


def _update(home, args, manager: str) -> int:
    """``machine init`` again for a cluster this device joined: new manager addresses (and name)."""
    from malai.config.cluster_info import parse_cluster_info
    from malai.errors import MalaiError

    path = home.cluster_dir(args.alias) / "cluster-info.toml"
    if (path.parent / "cluster.toml").exists():
        raise MalaiError(f"this device manages cluster {args.alias!r}; it cannot join it as a machine")
    old = parse_cluster_info(path.read_text(), str(path))
    if old.manager_id52 != manager:
        raise MalaiError(f"cluster {args.alias!r} here has manager {old.manager_id52}, not {manager}; to join "
                         f"another cluster pick another alias, or remove {path.parent} first")
    info = ClusterInfo(args.alias, manager, tuple(args.addr), args.name or old.machine_name)
    write_atomic(path, render_cluster_info(info).encode())
    addrs = ", ".join(args.addr) or "none (LAN discovery, a relay or Tor must find it)"
    print(f"Cluster {args.alias!r}: the manager's addresses are now {addrs}.")
    from malai.cli.rescan import notify_daemon

    notify_daemon(home, args.alias)
    return 0
