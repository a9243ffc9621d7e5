"""``malai info``: the clusters of this device."""

from malai.cli.common import home_of, print_json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="list this device's clusters, roles and ID52s")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=run)


def run(args) -> int:
    entries = home_of(args).scan()
    rows = [{"cluster": e.alias, "role": e.role, "id52": e.id52} for e in entries]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no clusters yet: run `malai cluster init NAME` or `malai machine init CM-ID52 ALIAS`")
    for e in entries:
        state = "" if e.ok else "  (problems: run `malai rescan --check`)"
        print(f"{e.alias:<20} {e.role or '?':<8} {e.id52 or '-'}{state}")
    return 0
