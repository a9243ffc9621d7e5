"""The ``malai`` command."""

import argparse
import sys
from typing import List, Optional

import malai
from malai.errors import MalaiError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from malai.cli import (
        acl,
        cluster,
        config,
        daemon,
        identity,
        info,
        keygen,
        logs,
        machine,
        machines,
        ping,
        rescan,
        service,
        share,
        socks,
    )

    parser = argparse.ArgumentParser(
        prog="malai",
        description="Peer-to-peer infrastructure: run commands and reach services by identity.",
    )
    parser.add_argument("--home", help="MALAI_HOME to use (default: $MALAI_HOME or ~/.local/share/malai)")
    parser.add_argument("--version", action="version", version=f"malai {malai.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (keygen, identity, cluster, machine, machines, info, rescan, acl, config, daemon, logs, ping, service,
                   socks, share):
        module.add_parser(sub)
    return parser


SUBCOMMANDS = frozenset({"acl", "cluster", "config", "daemon", "forward", "identity", "info", "keygen", "logs",
                         "machine", "machines", "open", "ping", "rescan", "service", "socks", "status", "stop", "tcp",
                         "tcp-bridge"})


def _remote_argv(argv: List[str]) -> Optional[tuple]:
    """(home, remote argv) when ``argv`` runs a command on a machine rather than a subcommand."""
    home = None
    rest = list(argv)
    if rest[:1] == ["--home"] and len(rest) > 1:
        home, rest = rest[1], rest[2:]
    elif rest and rest[0].startswith("--home="):
        home, rest = rest[0].split("=", 1)[1], rest[1:]
    if not rest or rest[0] in SUBCOMMANDS or rest[0] in ("-h", "--help", "--version"):
        return None
    return home, rest


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    remote = _remote_argv(argv)
    if remote is not None:
        from pathlib import Path

        from malai.cli import remote as remote_cli
        from malai.paths import default_home

        home = Path(remote[0]) if remote[0] else default_home()
        if remote[1][0] in ("ssh", "cp"):
            from malai.cli import ssh

            return (ssh.main if remote[1][0] == "ssh" else ssh.copy)(remote[1][1:], home)
        return remote_cli.main(remote[1], home)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except MalaiError as e:
        for line in str(e).splitlines():
            print(f"malai: {line}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file or folder we cannot read or write
        where = f" {e.filename}" if e.filename else ""
        print(f"malai:{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> None:
    sys.exit(main())
