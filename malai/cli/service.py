"""``malai service add|remove|list``: the forwards in ``malai.toml``, applied live;
``malai forward``: one forward in the foreground until Ctrl-C."""

import os
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
    h = kinds.add_parser("http", help="the HTTP front: http://<service>.<cluster>.localhost:PORT",
                         description="Serve http://<service>.<cluster>.localhost:PORT on LISTEN, reaching the "
                                     "machines' HTTP services (sets [http] listen).")
    h.add_argument("listen", help="HOST:PORT, e.g. 127.0.0.1:8080")
    h.set_defaults(run=run_add_http)
    r = actions.add_parser("remove", help="remove a forward", description="Remove a forward and close its "
                                                                         "listener.")
    r.add_argument("name", help="a tcp forward's name, or http for the HTTP front")
    r.set_defaults(run=run_remove)
    ls = actions.add_parser("list", help="list forwards", description="The forwards in malai.toml, with "
                                                                     "live counts when the daemon runs.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(run=run_list)

    o = sub.add_parser("open", help="the URL of an HTTP service (opened in a browser when there is one)",
                       description="Print http://<service>.<cluster>.localhost:PORT for the HTTP front, and open "
                                   "it in a browser when one is available (--print-only: never).")
    o.add_argument("service", help="<service>.<cluster> or <service>.<machine>.<cluster>")
    o.add_argument("--print-only", action="store_true", help="do not start a browser")
    o.set_defaults(run=run_open)

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
    if args.name == "http":
        raise UsageError("'http' names the HTTP front in `malai service remove`; pick another name")
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


def run_add_http(args) -> int:
    _check(args.listen, check_addr, "listen address")
    home = home_of(args)

    def add(doc) -> None:
        if "http" in doc:
            raise MalaiError(f"the HTTP front is already set in {home.device_config} "
                             f"(listen = {doc['http'].get('listen')!r}); remove it first (malai service remove http)")
        table = tomlkit.table()
        table["listen"] = args.listen
        doc["http"] = table

    _edit(home, add)
    print(f"the HTTP front listens on {args.listen}: http://<service>.<cluster>.localhost:{args.listen.rsplit(':', 1)[1]}/")
    return _apply(home)


def _remove_http(doc, home) -> None:
    if "http" not in doc:
        raise MalaiError(f"no HTTP front in {home.device_config}")
    del doc["http"]


def run_remove(args) -> int:
    home = home_of(args)

    def remove(doc) -> None:
        if args.name == "http":
            _remove_http(doc, home)
            return
        tcp = doc.get("tcp", {})
        if args.name not in tcp:
            known = ", ".join(tcp) or "none"
            raise MalaiError(f"no forward {args.name!r} in {home.device_config}; forwards: {known}")
        del tcp[args.name]
        if not tcp:
            del doc["tcp"]

    _edit(home, remove)
    print("removed the HTTP front" if args.name == "http" else f"removed tcp.{args.name}")
    return _apply(home)


def _apply(home) -> int:
    from malai.cli.rescan import apply_if_running

    return run_twisted(apply_if_running, home, None, False)


def run_list(args) -> int:
    home = home_of(args)
    device = home.load_device()
    state = run_twisted(_live_state, home)
    live = {f["name"]: f for f in state.get("forwards", [])}
    rows = []
    for name, forward in sorted(device.tcp.items()):
        row = {"name": name, "kind": "tcp", "local": forward.local, "remote": forward.remote}
        if name in live:
            row.update(listening=live[name]["local"], active=live[name]["active"], total=live[name]["total"])
        rows.append(row)
    if device.http_listen:
        row = {"name": "http", "kind": "http", "local": device.http_listen}
        if state.get("http"):
            row.update(listening=state["http"], urls=state["http_urls"])
        rows.append(row)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no forwards in {home.device_config}; add one with: malai service add tcp NAME LOCAL REMOTE")
    for row in rows:
        if row["kind"] == "http":
            urls = ", ".join(row["urls"]) or "no services to reach" if "urls" in row else "not running"
            print(f"http front        {row['local']:<22} → {urls}")
            continue
        live_state = f"{row['active']} open, {row['total']} since start" if "active" in row else "not running"
        print(f"tcp.{row['name']:<12} {row['local']:<22} → {row['remote']:<32} {live_state}")
    return 0


async def _live_state(reactor, home) -> dict:
    from malai.cli.daemon import RUNNING, daemon_state

    state = await daemon_state(reactor, home)
    return state if state["state"] == RUNNING else {}


def run_open(args) -> int:
    home = home_of(args)
    listen = home.load_device().http_listen
    if not listen:
        raise MalaiError(f"no HTTP front in {home.device_config}: add one with "
                         "`malai service add http 127.0.0.1:8080`")
    url = run_twisted(_url, home, args.service, listen)
    print(url)
    if not args.print_only and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                or sys.platform == "darwin") and sys.stdout.isatty():
        import webbrowser

        webbrowser.open(url)
    return 0


async def _url(reactor, home, service: str, listen: str) -> str:
    from malai.cli.direct import DirectContext
    from malai.services.http_front import resolve_host

    host = f"{service}.localhost"
    remote, why = resolve_host(DirectContext(home, reactor), host)
    if remote is None:
        raise MalaiError(why)
    port = (await _live_state(reactor, home)).get("http", listen).rsplit(":", 1)[1]
    return f"http://{host}:{port}/"


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
    context = DirectContext(home, reactor)
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
