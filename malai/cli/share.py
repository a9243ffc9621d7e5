"""``malai tcp PORT --allow ID52…`` shares a local TCP port with the named ID52s;
``malai tcp-bridge ID52 --addr HOST:PORT`` reaches one. Both run in the foreground
until Ctrl-C (``malai.services.sharing``), as a sharing identity (``malai.sharing``)."""

import signal
import sys
from typing import List

from malai.cli.common import home_of, log_to_stderr, run_twisted
from malai.config.reader import check_addr
from malai.errors import MalaiError, UsageError
from malai.identity import ID52Error, parse_id52
from malai.sharing import DEFAULT, IdentityStore, check_identity_name

__all__ = ["add_parser", "parse_allow", "peer_listen"]

DEFAULT_PEER_LISTEN = "tcp:0"
DEFAULT_BRIDGE_LISTEN = "127.0.0.1:0"
_ENDPOINT_KINDS = ("tcp", "tcp6", "unix", "ssl", "systemd")


def add_parser(sub) -> None:
    t = sub.add_parser("tcp", help="share a local TCP port with the listed ID52s, until Ctrl-C",
                       description="Share HOST:PORT with the peers whose ID52s are given with --allow, and no "
                                   "one else: any other ID52's link is closed after the TLS handshake. Prints "
                                   "this side's ID52 and where peers dial it; a peer runs `malai tcp-bridge "
                                   "<id52> --addr HOST:PORT`. See docs/sharing.md.")
    t.add_argument("port", type=int, help="the local TCP port to share")
    t.add_argument("--host", default="127.0.0.1", help="the host that port is on (default 127.0.0.1)")
    t.add_argument("--allow", action="append", default=[], metavar="ID52",
                   help="an ID52 that may connect (repeat, or separate with commas); required")
    t.add_argument("--identity", default=DEFAULT, metavar="NAME",
                   help=f"the sharing identity to run as (default {DEFAULT!r}, created on first use)")
    t.add_argument("--listen", default=DEFAULT_PEER_LISTEN, metavar="ENDPOINT",
                   help=f"where peers dial this side: HOST:PORT or an endpoint string (default "
                        f"{DEFAULT_PEER_LISTEN}: every interface, a free port, printed)")
    t.add_argument("-v", "--verbose", action="store_true", help="log every link and connection, not only refusals")
    t.set_defaults(run=run_tcp)
    b = sub.add_parser("tcp-bridge", help="a local port reaching an ID52's `malai tcp` share, until Ctrl-C",
                       description="Listen on a local port and carry each connection to the `malai tcp` share "
                                   "of ID52, as this side's sharing identity (which the sharer must --allow). "
                                   "See docs/sharing.md.")
    b.add_argument("id52", help="the ID52 the sharer printed")
    b.add_argument("--addr", action="append", default=[], metavar="HOST:PORT",
                   help="where the sharer listens (repeat for several); required for now")
    b.add_argument("--listen", default=DEFAULT_BRIDGE_LISTEN, metavar="HOST:PORT",
                   help=f"the local address to listen on (default {DEFAULT_BRIDGE_LISTEN}: a free port, printed)")
    b.add_argument("--identity", default=DEFAULT, metavar="NAME",
                   help=f"the sharing identity to run as (default {DEFAULT!r}, created on first use)")
    b.add_argument("-v", "--verbose", action="store_true", help="log every connection, not only failures")
    b.set_defaults(run=run_bridge)


def parse_allow(values: List[str]) -> List[str]:
    """The ID52s of ``--allow`` options (each may list several, comma-separated)."""
    allow: List[str] = []
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            if item in ("*", "public"):
                raise UsageError(f"--allow {item!r} is not supported: a share is reached only by the ID52s it "
                                 "names; list each (--allow ID52 --allow ID52)")
            try:
                id52 = parse_id52(item)
            except ID52Error as e:
                raise UsageError(f"--allow: {e}") from None
            if id52 not in allow:
                allow.append(id52)
    return allow


def peer_listen(value: str) -> str:
    """An endpoint string for ``--listen``: ``HOST:PORT`` or an endpoint string as it is."""
    from malai.services.forwarding import listen_endpoint

    if value.split(":", 1)[0] in _ENDPOINT_KINDS:
        return value
    problem = check_addr(value.rsplit(":", 1)[0] + ":1" if value.endswith(":0") else value)
    if problem:
        raise UsageError(f"--listen: {problem}, or an endpoint string such as tcp:7420:interface=127.0.0.1")
    return listen_endpoint(value)


def run_tcp(args) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"port {args.port}: a TCP port is from 1 to 65535")
    allow = parse_allow(args.allow)
    if not allow:
        raise UsageError(f"refusing to share {args.host}:{args.port} with nobody: name each ID52 that may reach "
                         "it with --allow ID52 (a peer's `malai identity list` shows its ID52)")
    check_identity_name(args.identity)
    return run_twisted(_share, home_of(args), args, allow, peer_listen(args.listen))


def run_bridge(args) -> int:
    try:
        peer = parse_id52(args.id52)
    except ID52Error as e:
        raise UsageError(str(e)) from None
    for addr in args.addr:
        problem = check_addr(addr)
        if problem:
            raise UsageError(f"--addr: {problem}")
    if not args.addr:
        raise UsageError(f"no address for {peer}: pass --addr HOST:PORT, where `malai tcp` said it listens "
                         "(finding a sharer by LAN discovery or Tor is not built yet)")
    check_identity_name(args.identity)
    return run_twisted(_bridge, home_of(args), args, peer, peer_listen(args.listen))


def _identity(home, name: str, prefix: str):
    identity, created = IdentityStore(home.root).load_or_create(name)
    if created:
        print(f"{prefix}: created identity {name!r} ({identity.id52})", file=sys.stderr, flush=True)
    return identity


async def _share(reactor, home, args, allow: List[str], listen: str) -> int:
    from malai.services.sharing import TcpShare

    identity = _identity(home, args.identity, "malai tcp")
    log_to_stderr("malai tcp", args.verbose)
    share = TcpShare(reactor, identity, args.host, args.port, allow, listen)
    share.startService()
    try:
        await share.ready
    except Exception as e:
        raise MalaiError(f"cannot listen for peers on {args.listen}: {e}") from None
    where = share.address()
    print(f"ID52: {identity.id52}", flush=True)
    print(f"sharing {args.host}:{args.port} as identity {args.identity!r}; peers dial {where}", flush=True)
    print(f"allowed: {', '.join(allow)}", flush=True)
    print(f"a peer runs: malai tcp-bridge {identity.id52} --addr {_reachable(where)}", flush=True)
    print("Ctrl-C to stop", flush=True)
    await _until_signal(reactor)
    await share.stopService()
    print(f"stopped after {share.total} connections ({share.refused} refused)", file=sys.stderr)
    return 0


async def _bridge(reactor, home, args, peer: str, listen: str) -> int:
    from malai.services.sharing import TcpBridge

    identity = _identity(home, args.identity, "malai tcp-bridge")
    log_to_stderr("malai tcp-bridge", args.verbose)
    bridge = TcpBridge(reactor, identity, peer, list(args.addr), listen)
    bridge.startService()
    try:
        await bridge.ready
    except Exception as e:
        raise MalaiError(f"cannot listen on {args.listen}: {e}") from None
    print(f"tcp-bridge on {bridge.address()} → {peer}, as {identity.id52} (identity {args.identity!r}); "
          "Ctrl-C to stop", flush=True)
    bridge.connect().addCallbacks(
        lambda link: print(f"linked to {peer} at {link.peer.hint}", file=sys.stderr, flush=True),
        lambda f: print(f"malai tcp-bridge: cannot link yet: {f.getErrorMessage()}; "
                        "each connection tries again", file=sys.stderr, flush=True))
    await _until_signal(reactor)
    await bridge.stopService()
    print(f"stopped after {bridge.factory.total} connections", file=sys.stderr)
    return 0


def _reachable(address: str) -> str:
    """``address`` with a wildcard host replaced by a placeholder a person fills in."""
    host, _, port = address.rpartition(":")
    return f"<this host's address>:{port}" if host in ("0.0.0.0", "::", "") else address


async def _until_signal(reactor) -> None:
    from twisted.internet.defer import Deferred

    stopped: Deferred = Deferred()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: reactor.callFromThread(lambda: stopped.called or stopped.callback(None)))
    await stopped
