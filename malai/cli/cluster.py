"""``malai cluster init``: become the manager of a new cluster."""

from malai.atomic import write_atomic
from malai.cli.common import home_of
from malai.config.reader import check_name
from malai.errors import UsageError

TEMPLATE = '''\
# cluster.toml: the source of truth for cluster {name!r}, managed by this device.
# Edit, then run `malai rescan {name}`; every machine gets its part of it.

[cluster_manager]
id52 = "{id52}"          # this device, the cluster manager
cluster_name = "{name}"
# config_editors = "admins"  # who may download/upload this file remotely

# [group.admins]
# members = "<id52>, laptop"  # ID52s, machine names, other groups

# [machine.web01]
# id52 = "<the ID52 printed by `malai machine init` on web01>"
# addrs = ["192.0.2.10:7420"]
# allow_from = "admins"      # who may run commands; absent = nobody
# username = "deploy"        # run commands as this user

# [machine.web01.http.admin]
# port = 8080
# allow_from = "admins"
'''


def add_parser(sub) -> None:
    p = sub.add_parser("cluster", help="manage clusters this device manages")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = csub.add_parser("init", help="create a cluster with this device as its manager",
                           description="Create clusters/<name>/cluster.toml and the manager key.")
    init.add_argument("name", help="cluster name: lowercase letters, digits and '-'")
    init.set_defaults(run=run_init)
    from malai.cli.invite import add_invite_parsers

    add_invite_parsers(csub)


def run_init(args) -> int:
    error = check_name(args.name)
    if error:
        raise UsageError(f"cluster name {error}")
    home = home_of(args)
    folder, identity = home.new_cluster(args.name, "cluster.private-key")
    write_atomic(folder / "cluster.toml", TEMPLATE.format(name=args.name, id52=identity.id52).encode())
    print(f"Created cluster {args.name!r}; this device is its manager.")
    print(f"  manager ID52: {identity.id52}")
    print(f"  config:       {folder / 'cluster.toml'}")
    print("Next steps:")
    print(f"  1. on each machine: malai machine init {identity.id52} {args.name} --addr <this-host>:7420")
    print(f"  2. add the [machine.NAME] snippet it prints to {folder / 'cluster.toml'}")
    print(f"  3. check it: malai rescan --check {args.name}")
    from malai.cli.rescan import notify_daemon

    notify_daemon(home, args.name)
    return 0
