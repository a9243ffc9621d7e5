"""``malai identity create|list|export|import|delete``: the identities sharing commands run as
(``malai.sharing``)."""

import sys

from malai.cli.common import home_of, print_json
from malai.errors import MalaiError
from malai.identity import Identity, KeyFileError
from malai.sharing import DEFAULT, IdentityStore

__all__ = ["add_parser"]

MAX_IMPORT = 4096  # a key file is 65 bytes; anything much longer is not one


def add_parser(sub) -> None:
    p = sub.add_parser("identity", help="sharing identities: create, list, export, import, delete",
                       description="The identities `malai tcp` and `malai tcp-bridge` run as, kept in "
                                   "$MALAI_HOME/identities/NAME.private-key (mode 0600). A sharing command "
                                   f"uses {DEFAULT!r} unless given --identity, creating it on first use. "
                                   "See docs/sharing.md.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = actions.add_parser("create", help="make a new identity; prints its ID52",
                           description="Make a new identity and print its ID52 (alone) on stdout.")
    c.add_argument("name", nargs="?", default=DEFAULT, help=f"its name (default {DEFAULT!r})")
    c.set_defaults(run=run_create)
    ls = actions.add_parser("list", help="the identities and their ID52s",
                            description="Every identity: name, ID52, or why its key file cannot be used.")
    ls.add_argument("--json", action="store_true", help="a JSON list of {name, id52, problem}")
    ls.set_defaults(run=run_list)
    e = actions.add_parser("export", help="print an identity's secret key (to move it to another device)",
                           description="Print the secret key of NAME on stdout, to be piped to `malai identity "
                                       "import` elsewhere. Whoever has it can act as this identity. Refused when "
                                       "stdout is a terminal unless --force.")
    e.add_argument("name")
    e.add_argument("--force", action="store_true", help="print the key even to a terminal")
    e.set_defaults(run=run_export)
    i = actions.add_parser("import", help="store a secret key read from stdin as NAME",
                           description="Read a secret key (64 hex characters, as `malai identity export` prints "
                                       "it) from stdin and store it as NAME; prints its ID52. An existing NAME is "
                                       "never replaced.")
    i.add_argument("name")
    i.set_defaults(run=run_import)
    d = actions.add_parser("delete", help="delete an identity's key file",
                           description="Delete NAME's key file. Its ID52 is gone for good unless the key was "
                                       "exported.")
    d.add_argument("name")
    d.set_defaults(run=run_delete)


def run_create(args) -> int:
    identity = IdentityStore(home_of(args).root).create(args.name)
    print(identity.id52)
    return 0


def run_list(args) -> int:
    store = IdentityStore(home_of(args).root)
    entries = store.entries()
    if args.json:
        print_json([{"name": name, "id52": identity.id52 if identity else None, "problem": problem}
                    for name, identity, problem in entries])
        return 0
    if not entries:
        print(f"no identities in {store.folder}; `malai identity create` makes one", file=sys.stderr)
    for name, identity, problem in entries:
        print(f"{name:<16} {identity.id52 if identity else 'unusable: ' + str(problem)}")
    return 0


def run_export(args) -> int:
    identity = IdentityStore(home_of(args).root).load(args.name)
    if sys.stdout.isatty() and not args.force:
        raise MalaiError(f"not printing the secret key of {args.name!r} to a terminal; redirect it "
                         f"(malai identity export {args.name} > FILE) or pass --force")
    print(f"warning: this is the secret key of {args.name!r} ({identity.id52}); whoever has it can act as "
          "this identity", file=sys.stderr)
    print(identity.secret_hex)
    return 0


def run_import(args) -> int:
    text = sys.stdin.read(MAX_IMPORT + 1)
    if len(text) > MAX_IMPORT:
        raise MalaiError("stdin holds more than a secret key; expected 64 hex characters")
    try:
        identity = Identity.from_hex(text)
    except KeyFileError as e:
        raise MalaiError(f"stdin: {e} (as `malai identity export` prints it)") from None
    IdentityStore(home_of(args).root).create(args.name, identity)
    print(identity.id52)
    return 0


def run_delete(args) -> int:
    id52 = IdentityStore(home_of(args).root).delete(args.name)
    print(f"deleted identity {args.name!r} ({id52 or 'an unusable key file'})", file=sys.stderr)
    return 0
