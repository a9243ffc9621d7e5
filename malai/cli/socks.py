"""``malai socks [--listen HOST:PORT]``: a SOCKS5 proxy whose names are malai names, in the foreground
until Ctrl-C (malai.services.socks). ``malai ssh -D`` runs the same."""

import signal
import sys

from malai.cli.common import home_of, log_to_stderr, run_twisted
from malai.config.reader import check_addr
from malai.errors import MalaiError, UsageError

__all__ = ["add_parser", "foreground", "serve"]

DEFAULT_LISTEN = "127.0.0.1:1080"


def add_parser(sub) -> None:
    p = sub.add_parser("socks", help="a SOCKS5 proxy to machines' services by name, until Ctrl-C",
                       description="A SOCKS5 proxy (CONNECT, no authentication) whose names are malai names: "
                                   "<service>.<machine>.<cluster> (any port) reaches that TCP service as "
                                   "`malai forward` would, <service>.<cluster>.localhost the HTTP front. IP "
                                   "addresses and other names are refused: clients must send names "
                                   "(socks5h://, curl --socks5-hostname). Needs no daemon; uses the daemon's "
                                   "HTTP front when it has one. See docs/ssh.md.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to listen (default {DEFAULT_LISTEN}; port 0: a free one, printed)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection, not only refusals")
    p.set_defaults(run=run_socks)


def check_listen(listen: str) -> None:
    problem = check_addr(listen.rsplit(":", 1)[0] + ":1" if listen.endswith(":0") else listen)
    if problem:
        raise UsageError(f"--listen: {problem}")


def run_socks(args) -> int:
    check_listen(args.listen)
    return run_twisted(serve, home_of(args), args.listen, args.verbose)


def foreground(root, listen: str, verbose: bool, prefix: str, failed: int) -> int:
    """The proxy until Ctrl-C, for ``malai ssh -N -D``: errors as ``prefix: …`` and exit ``failed``."""
    from malai.home import Home

    try:
        check_listen(listen)
        return run_twisted(serve, Home(root), listen, verbose)
    except MalaiError as e:
        for line in str(e).splitlines():
            print(f"{prefix}: {line}", file=sys.stderr)
        return failed


async def _front(reactor, home):
    """The daemon's HTTP front as (host, port), or None when it has none."""
    from malai.cli.daemon import RUNNING, daemon_state

    state = await daemon_state(reactor, home)
    listen = state.get("http") if state["state"] == RUNNING else None
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), int(port)


async def serve(reactor, home, listen: str, verbose: bool = False) -> int:
    from twisted.internet.defer import Deferred

    from malai.cli.direct import DirectContext
    from malai.services.http_front import HttpFront
    from malai.services.socks import SocksProxy
    from malai.tap import raise_fd_limit

    raise_fd_limit()
    context = DirectContext(home, reactor)
    if not context.clusters:
        raise MalaiError(f"this device is in no cluster ({home.root}): nothing to proxy to")
    log_to_stderr("malai socks", verbose)
    front = await _front(reactor, home)
    services = []
    if front is None:  # an HTTP front of our own, on loopback
        own = HttpFront(context, "127.0.0.1:0")
        own.startService()
        services.append(own)
        port = await own.ready
        front, where = ("127.0.0.1", port.getHost().port), "its own HTTP front"
    else:
        where = f"the daemon's HTTP front {front[0]}:{front[1]}"
    proxy = SocksProxy(context, listen, front)
    proxy.startService()
    try:
        await proxy.ready
    except Exception as e:
        raise MalaiError(f"cannot listen on {listen}: {e}") from None
    services.append(proxy)
    print(f"SOCKS5 proxy on {proxy.address()}: <service>.<machine>.<cluster> reaches a TCP service, "
          f"<service>.<cluster>.localhost an HTTP service ({where}); Ctrl-C to stop", flush=True)
    stopped: Deferred = Deferred()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: reactor.callFromThread(lambda: stopped.called or stopped.callback(None)))
    await stopped
    for service in reversed(services):
        await service.stopService()
    await context.close()
    print(f"stopped after {proxy.factory.total} requests", file=sys.stderr)
    return 0
