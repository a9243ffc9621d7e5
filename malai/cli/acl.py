"""``malai acl check``: explain whether a member may do something (on the manager)."""

from malai.acl import Acl
from malai.cli.common import home_of
from malai.errors import MalaiError, UsageError
from malai.home import MANAGER
from malai.identity import ID52Error, parse_id52


def add_parser(sub) -> None:
    p = sub.add_parser("acl", help="inspect who may do what")
    asub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = asub.add_parser(
        "check", help="explain whether a member may run a command or reach a service",
        description="On the cluster manager: print allowed or denied with the rule that decided. "
                    "Exit 0 when allowed, 1 when denied.")
    c.add_argument("cluster")
    c.add_argument("--from", dest="caller", required=True, metavar="ID52-OR-NAME", help="the caller")
    c.add_argument("--machine", metavar="M", help="the machine to run on (or that has --service)")
    c.add_argument("--command", nargs="+", metavar="CMD", help="the argv to run (absent: any command)")
    c.add_argument("--shell", action="store_true", help="check interactive shell access")
    c.add_argument("--service", metavar="S", help="a tcp or http service name")
    c.set_defaults(run=run)


def run(args) -> int:
    if not args.machine and not args.service:
        raise UsageError("give --machine M (with --command or --shell) or --service S")
    if args.service and (args.command or args.shell):
        raise UsageError("--service checks a service; leave out --command and --shell")
    entry = home_of(args).scan(args.cluster)[0]
    if entry.role != MANAGER:
        raise MalaiError(f"cluster {args.cluster!r} is not managed on this device; run `malai acl check` on its manager")
    if entry.cluster is None:
        raise MalaiError("\n".join(entry.problems))
    config = entry.cluster
    acl = Acl.for_cluster(config)
    caller = _caller(config, args.caller)
    if args.service:
        decision = _service_decision(acl, config, args.machine, args.service, caller)
    else:
        machine = _machine(config, args.machine)
        if args.shell:
            decision = acl.can_run(machine, caller, [])
        elif args.command:
            decision = acl.can_run(machine, caller, args.command)
        else:
            decision = acl.check(f"machine.{machine.name}.allow_from", machine.allow_from, caller)
    print(decision)
    return 0 if decision.allowed else 1


def _caller(config, text: str) -> str:
    if text in config.machines:
        return config.machines[text].id52
    try:
        return parse_id52(text)
    except ID52Error:
        raise UsageError(f"--from {text!r}: not a machine of {config.manager.cluster_name} nor an ID52") from None


def _machine(config, name: str):
    if name not in config.machines:
        raise UsageError(f"--machine {name!r}: no such machine; machines: {', '.join(config.machines) or 'none'}")
    return config.machines[name]


def _service_decision(acl, config, machine_name, service, caller):
    machines = [_machine(config, machine_name)] if machine_name else list(config.machines.values())
    found = [(m, kind) for m in machines for kind in ("tcp", "http") if service in getattr(m, kind)]
    if not found:
        raise UsageError(f"--service {service!r}: no machine exposes it")
    if len(found) > 1:
        where = ", ".join(f"{kind} on {m.name}" for m, kind in found)
        raise UsageError(f"--service {service!r} is ambiguous ({where}); add --machine")
    machine, kind = found[0]
    return acl.can_reach(machine, kind, service, caller)
