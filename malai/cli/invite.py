"""``malai cluster invite`` / ``invites`` on the manager and ``malai machine join`` on the new device."""

import shutil
import sys
import time

from malai.cli.common import home_of, print_json, run_twisted
from malai.config.reader import check_addr, check_name
from malai.errors import MalaiError, UsageError

__all__ = ["add_invite_parsers", "add_join_parser"]


def add_invite_parsers(csub) -> None:
    invite = csub.add_parser(
        "invite", help="make a one-time token with which a new device joins as a machine",
        description="Print a one-line token (alone on stdout) for `malai machine join` on the new device: "
                    "the manager's ID52 and addresses, a one-time secret and the machine's name. The device "
                    "is added to cluster.toml as [machine.NAME] (a new config version) when it joins.")
    invite.add_argument("cluster", help="a cluster this device manages")
    invite.add_argument("name", metavar="machine-name", help="the new machine's name in cluster.toml")
    invite.add_argument("--group", action="append", default=[], metavar="G", help="add it to this group "
                        "(repeatable; the group must exist)")
    invite.add_argument("--allow-from", default="", metavar="EXPR",
                        help="who may run commands on it (its allow_from; default: nobody until you set it)")
    invite.add_argument("--expires", default="1h", metavar="DURATION", help="90s, 30m, 1h (default), 7d")
    invite.add_argument("--addr", action="append", default=[], metavar="HOST:PORT",
                        help="where the device reaches this manager (default: where the running daemon listens)")
    invite.set_defaults(run=run_invite)
    invites = csub.add_parser("invites", help="list or revoke pending invites",
                              description="The invites of CLUSTER not yet used, revoked or expired.")
    invites.add_argument("cluster", help="a cluster this device manages")
    invites.add_argument("--revoke", metavar="ID", help="revoke this invite: its token no longer works")
    invites.add_argument("--json", action="store_true", help="a JSON list of {id, name, groups, expires, created}")
    invites.set_defaults(run=run_invites)


def add_join_parser(msub) -> None:
    join = msub.add_parser(
        "join", help="join a cluster with an invite token",
        description="Create this device's identity in the cluster, reach its manager, prove the invite's "
                    "secret, and wait to be added; the running daemon then takes the cluster's config.")
    join.add_argument("token", help="the line `malai cluster invite` printed on the manager")
    join.add_argument("--alias", help="local name for the cluster (default: the cluster's name)")
    join.set_defaults(run=run_join)


def _managed(home, cluster: str):
    from malai.config.invites import InviteStore

    folder = home.cluster_dir(cluster)
    if not (folder / "cluster.toml").exists():
        raise MalaiError(f"this device does not manage a cluster {cluster!r} (no {folder / 'cluster.toml'})")
    return InviteStore(folder)


def run_invite(args) -> int:
    from malai.config.invites import Token, parse_duration

    for value in (args.name, *args.group):
        if check_name(value):
            raise UsageError(f"{value!r}: {check_name(value)}")
    for addr in args.addr:
        if check_addr(addr):
            raise UsageError(f"--addr: {check_addr(addr)}")
    lifetime = parse_duration(args.expires)
    home = home_of(args)
    store = _managed(home, args.cluster)
    entry = home.scan(args.cluster)[0]
    if entry.cluster is None:
        raise MalaiError("\n".join(entry.problems) or f"cluster {args.cluster!r} cannot be read")
    if args.name in entry.cluster.machines:
        raise MalaiError(f"cluster.toml has a machine {args.name!r} already; pick another name")
    missing = [g for g in args.group if g not in entry.cluster.groups]
    if missing:
        raise MalaiError(f"cluster.toml has no group {', '.join(map(repr, missing))}")
    _check_addition(entry.path / "cluster.toml", args)
    addrs = args.addr or run_twisted(_listen_addresses, home)
    invite, secret = store.create(args.name, tuple(args.group), lifetime, args.allow_from)
    token = Token(entry.cluster.manager.id52, entry.cluster.manager.cluster_name, args.name, secret, tuple(addrs))
    print(token.encode())
    print(f"invite {invite.id} for machine {args.name!r} of {args.cluster}, valid once until "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(invite.expires))}; on the new device run:\n"
          f"  malai machine join <the token above>", file=sys.stderr)
    if not addrs:
        print("the token names no address of this manager (no daemon runs here, and no --addr): the device "
              "must find it on the LAN", file=sys.stderr)
    return 0


def _check_addition(path, args) -> None:
    """Refuse now an invite whose machine cluster.toml would not take (a bad --allow-from, say)."""
    from malai.config.cluster import parse_cluster
    from malai.config.errors import ConfigError
    from malai.config.invites import Invite, add_machine

    invite = Invite("check", args.name, tuple(args.group), 0.0, "", 0.0, args.allow_from)
    try:
        parse_cluster(add_machine(path.read_text(), args.name, "0" * 51 + "g", invite), str(path))
    except ConfigError as e:
        raise MalaiError(f"cluster.toml would not take machine {args.name!r} so:\n{e}") from None


async def _listen_addresses(reactor, home) -> list:
    """Where the running daemon listens, as HOST:PORT a device can dial (a wildcard: each LAN address)."""
    from malai.cli.daemon import RUNNING, daemon_state
    from malai.services.discovery import lan_interfaces

    state = await daemon_state(reactor, home)
    if state["state"] != RUNNING:
        return []
    out = []
    for listen in state["listen"]:
        host, _, port = listen.rpartition(":")
        if not port.isdigit():
            continue
        if host.strip("[]") in ("", "0.0.0.0", "::"):
            out.extend(f"{ip}:{port}" for ip, _ in lan_interfaces([listen])[0])
        else:
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out


def run_invites(args) -> int:
    store = _managed(home_of(args), args.cluster)
    if args.revoke:
        invite = store.revoke(args.revoke)
        print(f"revoked invite {invite.id} for {invite.name!r}: its token no longer works")
        return 0
    pending = store.pending()
    if args.json:
        print_json([i.as_dict() for i in pending])
        return 0
    if not pending:
        print(f"no pending invites for {args.cluster}")
    for i in pending:
        groups = f", groups {', '.join(i.groups)}" if i.groups else ""
        print(f"{i.id}  {i.name}{groups}, expires {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(i.expires))}")
    return 0


def run_join(args) -> int:
    from malai.atomic import write_atomic
    from malai.config.cluster_info import render_cluster_info
    from malai.config.invites import Token
    from malai.config.models import ClusterInfo

    token = Token.decode(args.token)
    alias = args.alias or token.cluster
    if check_name(alias):
        raise UsageError(f"--alias: {check_name(alias)}")
    home = home_of(args)
    folder, identity = home.new_cluster(alias, "machine.private-key")
    try:
        info = ClusterInfo(alias, token.manager, token.addrs, token.name)
        write_atomic(folder / "cluster-info.toml", render_cluster_info(info).encode())
        return run_twisted(_join, home, alias, token)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # a refused join leaves nothing behind: it can be run again
        raise


async def _join(reactor, home, alias: str, token) -> int:
    from twisted.internet.error import ConnectionClosed

    from malai.cli.direct import DirectContext
    from malai.cli.rescan import apply_if_running
    from malai.peer.commands import JoinCluster, JoinRefused

    context = DirectContext(home, reactor, alias)
    try:
        svc = context.cluster(alias)
        try:
            link = await context.pool.get(svc.identity, token.manager)
        except ConnectionClosed as e:
            raise MalaiError(f"the manager closed the link at once: it takes new devices only while an invite is "
                             f"pending, so this one is used, expired or revoked ({e}); ask the cluster's admin for "
                             "a new invite") from None
        answer = await link.callRemote(JoinCluster, secret=token.secret)
    except JoinRefused as e:
        raise MalaiError(f"the manager refused to let this device join: {e}") from None
    finally:
        await context.close()
    print(f"Joined cluster {answer['cluster']!r} as machine {answer['name']!r} (local alias {alias!r}).")
    print(f"  machine ID52: {svc.identity.id52}")
    await apply_if_running(reactor, home, alias, False)
    return 0
