"""``malai rescan``: validate the config files and keys (and apply them on a running daemon)."""

import sys

from malai.cli.common import home_of, run_twisted
from malai.config import ConfigError
from malai.errors import MalaiError


def add_parser(sub) -> None:
    p = sub.add_parser("rescan", help="validate configs and keys; apply them on the running daemon",
                       description="With --check: validate every config file and key, print each "
                                   "problem as file:line, exit 1 on any.")
    p.add_argument("cluster", nargs="?", help="only this cluster")
    p.add_argument("--check", action="store_true", help="only validate; change nothing")
    p.add_argument("--wait", action="store_true",
                   help="on a cluster manager: wait until every machine acked (a progress bar on a terminal)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds --wait waits; then exit 1 naming the machines not in sync (default 300)")
    p.add_argument("--json", action="store_true", help="with --wait: print the outcome as JSON")
    p.set_defaults(run=run)


def check(home, cluster) -> int:
    problems: list[str] = []
    try:
        home.load_device()
    except ConfigError as e:
        problems.extend(str(p) for p in e.problems)
    entries = home.scan(cluster)
    for entry in entries:
        problems.extend(entry.problems)
    for line in problems:
        print(line, file=sys.stderr)
    for entry in entries:
        print(f"{entry.alias}: {'ok' if entry.ok else 'INVALID'} ({entry.role or 'unknown role'})")
    return 1 if problems else 0


def run(args) -> int:
    home = home_of(args)
    if args.check:
        return check(home, args.cluster)
    return run_twisted(apply_if_running, home, args.cluster, True, args if args.wait else None)


async def apply_if_running(reactor, home, cluster, check_when_stopped: bool, wait=None) -> int:
    """``wait``: the ``--wait``, ``--timeout`` and ``--json`` of ``malai rescan``, or None
    (with ``--json`` what the rescan did goes to stderr, the JSON alone to stdout)."""
    from malai.cli.daemon import NOT_ANSWERING, RUNNING, STARTING, daemon_state

    state = await daemon_state(reactor, home)
    if state["state"] in (NOT_ANSWERING, STARTING):  # a starting daemon may have read the files already
        raise MalaiError(f"{state['fix']}\nnothing applied: run `malai rescan` once it answers")
    if state["state"] != RUNNING:  # the lock is free
        if not check_when_stopped:
            return 0
        code = check(home, cluster)
        print("the daemon is not running: nothing applied (it loads these files when it starts)")
        return code
    out = sys.stderr if wait is not None and wait.json else sys.stdout
    if check_when_stopped:
        print("the running daemon rescans:", file=out)
    else:
        print(f"the running daemon loads {cluster!r}:" if cluster else "the running daemon applies malai.toml:")
    code = await _apply(reactor, home, cluster, out)
    if wait is None or code:
        return code
    return await _wait_in_sync(reactor, home, cluster, wait.timeout, wait.json)


async def _apply(reactor, home, cluster, out=sys.stdout) -> int:
    """Ask the running daemon to rescan; print what it did per cluster."""
    from malai.control.client import call
    from malai.control.commands import Rescan

    kwargs = {"cluster": cluster} if cluster else {}
    answer = await call(reactor, home.socket, Rescan, check=False, **kwargs)
    refused = False
    for report in answer["reports"]:
        print(f"  {report['cluster']}: {report['action']}", file=out)
        for problem in report["problems"]:
            print(f"    {problem}", file=sys.stderr)
        refused = refused or report["action"] == "refused"
    return 1 if refused else 0


async def _wait_in_sync(reactor, home, cluster, timeout: float, as_json: bool) -> int:
    """Until every machine of the clusters this daemon manages (or of ``cluster``) acked its config,
    or ``timeout``: how many did so far, as a progress bar on a terminal; 1 naming the laggards."""
    from twisted.internet.task import deferLater

    from malai.cli.common import print_json
    from malai.control.client import call
    from malai.control.commands import Status

    deadline = reactor.seconds() + timeout
    bar = sys.stderr.isatty() and not as_json
    while True:
        asked = reactor.seconds()
        status = await call(reactor, home.socket, Status, summary=True)
        interval = max(0.5, 4 * (reactor.seconds() - asked))  # a big manager is asked less often
        managed = [c for c in status["clusters"] if c["role"] == "manager" and cluster in (None, c["cluster"])]
        total, acked = sum(c["machines"] for c in managed), sum(c["in_sync"] for c in managed)
        done = not any(c["publishing"] or c["pending"] or c["failing"] for c in managed)
        if bar:
            filled = 30 * acked // total if total else 30
            failing = sum(c["failing"] for c in managed)
            print(f"\r  [{'#' * filled}{'.' * (30 - filled)}] {acked}/{total} machines in sync"
                  + (f", {failing} failing" if failing else ""), end="", file=sys.stderr, flush=True)
        if done or reactor.seconds() >= deadline:
            break
        await deferLater(reactor, interval, lambda: None)
    if bar:
        print(file=sys.stderr)
    keys = ("cluster", "config_version", "machines", "in_sync", "pending", "failing")
    if as_json:
        print_json({"done": done, "clusters": [{**{k: c[k] for k in keys}, "laggards": [
            m for m in c["sync"] if m["sync"] != "in sync"]} for c in managed]})
        return 0 if done else 1
    print(f"  {acked} of {total} machines in sync" + ("" if done else f" after {timeout:g}s; not yet:"))
    for c in managed if not done else []:
        for m in c["sync"]:
            if m["sync"] != "in sync":
                print(f"    {c['cluster']}: {m['machine']} {m['sync']}" + (f": {m['error']}" if m["error"] else ""))
        more = c["pending"] + c["failing"] - sum(m["sync"] != "in sync" for m in c["sync"])
        if more > 0:
            print(f"    {c['cluster']}: … and {more} more (`malai status --json` lists every machine)")
    return 0 if done else 1


def notify_daemon(home, cluster: str) -> None:
    """After ``cluster init`` / ``machine init``: load the new cluster when a daemon runs."""
    run_twisted(apply_if_running, home, cluster, False)
