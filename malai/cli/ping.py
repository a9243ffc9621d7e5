"""``malai ping``: round trips to a peer over the pinned link."""

import sys

from malai.cli.common import home_of, run_twisted
from malai.control.commands import ControlFailed
from malai.errors import MalaiError, UsageError
from malai.identity import ID52Error, parse_id52


def add_parser(sub) -> None:
    p = sub.add_parser("ping", help="round trips to a peer",
                       description="Ping <machine>.<cluster> or an ID52 over a mutually authenticated link. "
                                   "Goes through the running daemon, or dials directly when none runs.")
    p.add_argument("target", help="<machine>.<cluster> (the manager is manager.<cluster>) or an ID52")
    p.add_argument("--cluster", help="the cluster whose identity to ping from (needed with an ID52 when "
                                     "this device is in several)")
    p.add_argument("--addr", action="append", default=[], metavar="HOST:PORT", help="dial this address")
    p.add_argument("--count", "-c", type=int, default=1, help="number of pings (default 1)")
    p.set_defaults(run=run)


def _split(home, args):
    """(cluster alias, peer name or ID52)."""
    try:
        peer = parse_id52(args.target)
    except ID52Error:
        name, dot, cluster = args.target.rpartition(".")
        if not dot or not name:
            raise UsageError(f"{args.target!r}: give <machine>.<cluster> or an ID52") from None
        return cluster, name
    if args.cluster:
        return args.cluster, peer
    aliases = home.aliases()
    if len(aliases) != 1:
        raise UsageError(f"this device is in {len(aliases)} clusters; say which with --cluster")
    return aliases[0], peer


def run(args) -> int:
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    home = home_of(args)
    cluster, peer = _split(home, args)
    return run_twisted(_pings, home, args, cluster, peer)


async def _pings(reactor, home, args, cluster, peer) -> int:
    from twisted.internet.task import deferLater

    from malai.cli.daemon import RUNNING, daemon_state

    via_daemon = (await daemon_state(reactor, home))["state"] == RUNNING
    pinger = _DaemonPinger(home) if via_daemon else _DirectPinger(home, cluster)
    answered = 0
    for i in range(args.count):
        if i:
            await deferLater(reactor, 1, lambda: None)
        try:
            result = await pinger.ping(reactor, cluster, peer, args.addr)
        except Exception as e:
            print(f"malai: {_message(e)}", file=sys.stderr)
            continue
        answered += 1
        print(f"answer from {args.target} via {result['address']} ({_path(result['address'])}): "
              f"{result['rtt'] * 1000:.2f} ms, "
              f"malai {result['version']}{' (through the daemon)' if via_daemon else ''}", flush=True)
    await pinger.close()
    return 0 if answered else 1


_PATHS = {"tcp": "direct", "relay": "relayed", "tor": "over Tor"}


def _path(address: str) -> str:
    """What kind of path a link took, from the hint it was made over."""
    return _PATHS.get(address.split(":", 1)[0], "over the link the peer opened")


def _message(error: Exception) -> str:
    return str(error) if isinstance(error, (MalaiError, ControlFailed)) else f"{type(error).__name__}: {error}"


class _DaemonPinger:
    def __init__(self, home):
        self.home = home

    def ping(self, reactor, cluster, peer, addrs):
        from malai.control.client import call
        from malai.control.commands import Ping

        return call(reactor, self.home.socket, Ping, cluster=cluster, peer=peer, addrs=addrs)

    async def close(self) -> None:
        pass


class _DirectPinger:
    """No daemon: dial from the cluster's identity with a link pool of our own."""

    def __init__(self, home, cluster):
        self.home = home
        self.alias = cluster
        self.context = None

    async def close(self) -> None:
        if self.context is not None:
            await self.context.close()

    async def ping(self, reactor, cluster, peer, addrs):
        from malai.cli.direct import DirectContext
        from malai.peer.ping import ping

        if self.context is None:
            self.context = DirectContext(self.home, reactor, self.alias)
        svc = self.context.cluster(cluster)
        link = await self.context.pool.get(svc.identity, svc.target(peer), addrs or None)
        result = await ping(link)
        return {"rtt": result.rtt, "address": result.address, "version": result.version}
