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
    return run_twisted(apply_if_running, home, args.cluster, True)


async def apply_if_running(reactor, home, cluster, check_when_stopped: bool) -> int:
    from malai.cli.daemon import NOT_ANSWERING, RUNNING, daemon_state

    state = await daemon_state(reactor, home)
    if state["state"] == NOT_ANSWERING:
        raise MalaiError(f"{state['fix']}\nnothing applied: run `malai rescan` once it answers")
    if state["state"] != RUNNING:  # the lock is free
        if not check_when_stopped:
            return 0
        code = check(home, cluster)
        print("the daemon is not running: nothing applied (it loads these files when it starts)")
        return code
    if check_when_stopped:
        print("the running daemon rescans:")
    else:
        print(f"the running daemon loads {cluster!r}:" if cluster else "the running daemon applies malai.toml:")
    return await _apply(reactor, home, cluster)


async def _apply(reactor, home, cluster) -> int:
    """Ask the running daemon to rescan; print what it did per cluster."""
    from malai.control.client import call
    from malai.control.commands import Rescan

    kwargs = {"cluster": cluster} if cluster else {}
    answer = await call(reactor, home.socket, Rescan, check=False, **kwargs)
    refused = False
    for report in answer["reports"]:
        print(f"  {report['cluster']}: {report['action']}")
        for problem in report["problems"]:
            print(f"    {problem}", file=sys.stderr)
        refused = refused or report["action"] == "refused"
    return 1 if refused else 0


def notify_daemon(home, cluster: str) -> None:
    """After ``cluster init`` / ``machine init``: load the new cluster when a daemon runs."""
    run_twisted(apply_if_running, home, cluster, False)
