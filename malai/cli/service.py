"""``malai service add|remove|list``: the forwards in ``malai.toml``, applied live;
``malai forward``: one forward in the foreground until Ctrl-C."""

import signal
import sys

import tomlkit

from malai.atomic import locked, write_atomic
from malai.cli.common import home_of, print_json, run_twisted
from malai.config import ConfigError
from malai.config.device import check_remote, parse_device
from malai.config.reader import check_addr, check_name
from malai.errors import MalaiError, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("service", help="local forwards to machines' services (malai.toml)",
                       description="Edit the forwards in $MALAI_HOME/malai.toml (comments kept, written "
                                   "atomically) and apply them on the running daemon.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("add", help="add a forward", description="Add a forward and start it.")
    kinds = a.add_subparsers(dest="kind", metavar="KIND", required=True)
    t = kinds.add_parser("tcp", help="a local TCP port reaching <service>.<machine>.<cluster>",
                         description="Listen on LOCAL and relay each connection to REMOTE's TCP service.")
    t.add_argument("name", help="a name for the forward, e.g. mysql")
    t.add_argument("local", help="HOST:PORT to listen on, e.g. 127.0.0.1:3306")
    t.add_argument("remote", help="<service>.<machine>.<cluster>, e.g. mysql.db01.company")
    t.set_defaults(run=run_add_tcp)
    r = actions.add_parser("remove", help="remove a forward", description="Remove a forward and close its "
                                                                         "listener.")
    r.add_argument("name")
    r.set_defaults(run=run_remove)
    ls = actions.add_parser("list", help="list forwards", description="The forwards in malai.toml, with "
                                                                     "live counts when the daemon runs.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(run=run_list)

    f = sub.add_parser("forward", help="forward a local port in the foreground until Ctrl-C",
                       description="Listen on LOCAL (default: a free port on 127.0.0.1) and relay each "
                                   "connection to REMOTE's TCP service, until Ctrl-C. Needs no daemon.")
    f.add_argument("remote", help="<service>.<machine>.<cluster>")
    f.add_argument("local", nargs="?", default="127.0.0.1:0", help="HOST:PORT to listen on")
    f.set_defaults(run=run_forward)


def _check(value: str, check, what: str) -> None:
    problem = check(value)
    if problem:
        raise UsageError(f"{what}: {problem}")


def _edit(home, change) -> None:
    """Apply ``change(document)`` to malai.toml under a lock; refuse a result that does not validate."""
    path = home.device_config
    home.ensure()
    with locked(path.with_name(".malai.toml.lock")):
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        try:
            parse_device(text, str(path))
        except ConfigError as e:
            raise MalaiError(f"{path} has problems; fix them first:\n{e}") from None
        doc = tomlkit.parse(text)
        change(doc)
        new = tomlkit.dumps(doc)
        try:
            parse_device(new, str(path))
        except ConfigError as e:
            raise MalaiError(f"the change would make {path} invalid:\n{e}") from None
        write_atomic(path, new.encode(), mode=0o644)


def run_add_tcp(args) -> int:
    _check(args.name, check_name, "name")
    _check(args.local, check_addr, "local address")
    _check(args.remote, check_remote, "remote")
    home = home_of(args)

    def add(doc) -> None:
        tcp = doc.setdefault("tcp", tomlkit.table(is_super_table=True))
        if args.name in tcp:
            raise MalaiError(f"there is already a forward tcp.{args.name} in {home.device_config}; "
                             f"remove it first (malai service remove {args.name})")
        for name, other in tcp.items():
            if other.get("local") == args.local:
                raise MalaiError(f"tcp.{name} already listens on {args.local}")
        entry = tomlkit.table()
        entry["local"] = args.local
        entry["remote"] = args.remote
        tcp[args.name] = entry

    _edit(home, add)
    print(f"added tcp.{args.name}: {args.local} → {args.remote} ({home.device_config})")
    return _apply(home)


def run_remove(args) -> int:
    home = home_of(args)

    def remove(doc) -> None:
        tcp = doc.get("tcp", {})
        if args.name not in tcp:
            known = ", ".join(tcp) or "none"
            raise MalaiError(f"no forward {args.name!r} in {home.device_config}; forwards: {known}")
        del tcp[args.name]
        if not tcp:
            del doc["tcp"]

    _edit(home, remove)
    print(f"removed tcp.{args.name}")
    return _apply(home)


def _apply(home) -> int:
    from malai.cli.rescan import apply_if_running

    return run_twisted(apply_if_running, home, None, False)


def run_list(args) -> int:
    home = home_of(args)
    device = home.load_device()
    live = {f["name"]: f for f in run_twisted(_live_forwards, home)}
    rows = []
    for name, forward in sorted(device.tcp.items()):
        row = {"name": name, "kind": "tcp", "local": forward.local, "remote": forward.remote}
        if name in live:
            row.update(listening=live[name]["local"], active=live[name]["active"], total=live[name]["total"])
        rows.append(row)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no forwards in {home.device_config}; add one with: malai service add tcp NAME LOCAL REMOTE")
    for row in rows:
        state = f"{row['active']} open, {row['total']} since start" if "active" in row else "not running"
        print(f"tcp.{row['name']:<12} {row['local']:<22} → {row['remote']:<32} {state}")
    return 0


async def _live_forwards(reactor, home) -> list:
    from malai.cli.daemon import RUNNING, daemon_state

    state = await daemon_state(reactor, home)
    return state.get("forwards", []) if state["state"] == RUNNING else []


def run_forward(args) -> int:
    from malai.services.forwarding import ServiceAddress

    try:
        ServiceAddress.parse(args.remote)
    except MalaiError as e:
        raise UsageError(str(e)) from None
    if args.local != "127.0.0.1:0":
        _check(args.local, check_addr, "local address")
    return run_twisted(_forward, home_of(args), args)


async def _forward(reactor, home, args) -> int:
    from twisted.internet.defer import Deferred

    from malai.cli.direct import DirectContext
    from malai.config.models import TcpForward
    from malai.services.forwarding import TcpForwarder
    from malai.tap import raise_fd_limit

    raise_fd_limit()
    context = DirectContext(home, reactor, spares=2)
    remote = args.remote.split(".")
    context.cluster(remote[2]).target(remote[1])  # an unknown cluster or machine fails here, not per connection
    forwarder = TcpForwarder(context, TcpForward("forward", args.local, args.remote))
    forwarder.startService()
    try:
        await forwarder.ready
    except Exception as e:
        raise MalaiError(f"cannot listen on {args.local}: {e}") from None
    print(f"forwarding {forwarder.address()} → {args.remote}; Ctrl-C to stop", flush=True)
    stopped: Deferred = Deferred()
    signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(stopped.callback, None))
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stopped.callback, None))
    await stopped
    await forwarder.stopService()
    await context.close()
    print(f"stopped after {forwarder.factory.total} connections", file=sys.stderr)
    return 0
