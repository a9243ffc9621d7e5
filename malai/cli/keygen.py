"""``malai keygen``: make a new identity."""

import sys

from malai.identity import Identity


def add_parser(sub) -> None:
    p = sub.add_parser("keygen", help="generate an identity",
                       description="Generate an ed25519 identity. Prints the ID52 on stderr and the "
                                   "secret key on stdout, or writes the key to --file (mode 0600).")
    p.add_argument("--file", metavar="PATH", help="write the secret key here; an existing file is never replaced")
    p.set_defaults(run=run)


def run(args) -> int:
    identity = Identity.generate()
    if args.file:
        identity.save(args.file)
        print(f"wrote the secret key to {args.file}", file=sys.stderr)
    else:
        print(identity.secret_hex)
    print(f"ID52: {identity.id52}", file=sys.stderr)
    return 0
