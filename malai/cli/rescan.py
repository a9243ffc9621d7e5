"""``malai rescan``: validate the config files and keys (and apply them on a running daemon)."""

import sys

from malai.cli.common import home_of
from malai.config import ConfigError
from malai.errors import UsageError


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
    raise UsageError("applying a rescan needs the daemon, which this version does not have yet; use --check")
