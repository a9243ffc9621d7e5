"""``malai ssh`` (and ``malai-ssh``): ssh's command line, so rsync, git, scp, sftp and habit work unchanged;
``malai cp``: scp over it.

Options are parsed as ssh parses them (getopt, again after the host); what only tunes ssh's own
transport is accepted and ignored, what malai cannot honour is refused with what to use instead.
As in ssh, the words after the host are joined into one command string; the machine runs it as
the argv it splits into, or through the login shell where ``allow_shell`` lets the caller
(malai.peer.shellwords). Stdlib only: this drives malai.cli.remote. The table of options is in
docs/ssh.md.
"""

import getpass
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from malai.cli import remote

__all__ = ["copy", "main", "run"]

EXIT_SSH = 255  # ssh's status for its own errors
FLAGS = frozenset("1246afgknqstvxACGKMNPTVXYy")
WITH_VALUE = frozenset("bceilmopBDEFIJLOQRSwW")
REFUSED = {
    "L": "-L port forwarding: use `malai forward` (docs/tcp.md)",
    "R": "-R remote port forwarding: expose the service in the machine's config (docs/tcp.md)",
    "W": "-W stdio forwarding: use `malai forward` (docs/tcp.md)",
    "w": "-w tunnel devices: not offered by malai",
    "N": "-N (no command, for port forwarding): use `malai forward` (docs/tcp.md), or -N with -D for SOCKS",
    "f": "-f (background after connecting): put malai in the background with your shell (&)",
    "Q": "-Q: malai has no ssh ciphers or algorithms to list",
}
REFUSED_KEYS = {"localforward": "L", "remoteforward": "R", "tunnel": "w"}

USAGE = """usage: malai ssh [-46AaCfGgKkMNnqsTtVvXxYy] [-B iface] [-b addr] [-c ciphers] [-E log] [-e char]
                 [-F config] [-I lib] [-i key] [-J jump] [-L ..] [-l user] [-m macs] [-O ctl] [-o option]
                 [-p port] [-Q q] [-R ..] [-S ctl] [-W ..] [-w ..] [-D [bind:]port] [--connect-timeout S]
                 [--timeout S] [user@]<machine>.<cluster> [command …]
ssh's command line for malai (docs/ssh.md): the command words are joined into one string; the
machine runs it as plain words, or through the login shell where allow_shell lets you.
-D [bind:]port runs a SOCKS5 proxy to malai names (malai socks) with the session; -N -D only that."""


class SshCall:
    """What an ssh command line asks for."""

    def __init__(self) -> None:
        self.opts = remote.Options()
        self.host: Optional[str] = None
        self.user: Optional[str] = None
        self.port: Optional[str] = None
        self.words: List[str] = []
        self.subsystem = False
        self.tty = 0  # how many -t
        self.no_tty = False
        self.print_config = False  # -G
        self.control: Optional[str] = None  # -O
        self.remote_command: Optional[str] = None  # -o RemoteCommand
        self.dynamic: Optional[str] = None  # -D [bind:]port: a SOCKS proxy (malai socks) as HOST:PORT
        self.no_command = False  # -N: only the SOCKS proxy
        self.verbose = 0
        self.ignored: List[str] = []


def parse(argv: List[str]) -> SshCall:
    """Parse as ssh does; SystemExit with a message for what cannot be honoured."""
    call = SshCall()
    rest = _options(call, list(argv), before_host=True)
    if not rest:
        raise SystemExit(USAGE)
    terminated = rest[0] == "--"
    if terminated:
        rest = rest[1:]
    if not rest:
        raise SystemExit(USAGE)
    _host(call, rest[0])
    rest = rest[1:]
    if rest and not terminated:
        rest = _options(call, rest, before_host=False)
        if rest[:1] == ["--"]:
            rest = rest[1:]
    call.words = rest
    if call.no_command and call.dynamic is None:
        raise SystemExit(f"malai ssh: {REFUSED['N']}")
    if call.no_command and rest:
        raise SystemExit(f"malai ssh: -N runs no command, yet {' '.join(rest)!r} follows")
    return call


def _options(call: SshCall, args: List[str], before_host: bool) -> List[str]:
    """Consume options like ssh's getopt (no reordering); return what is left."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        if arg.startswith("--"):  # malai's own, before the host
            word, _, value = arg.partition("=")
            if word == "--help":
                print(USAGE)
                raise SystemExit(0)
            if not value and before_host and i + 1 < len(args):
                i, value = i + 1, args[i + 1]
            i += 1
            if word == "--timeout" and before_host:
                call.opts.timeout = remote.seconds(word, value)
            elif word == "--connect-timeout" and before_host:
                call.opts.connect_timeout = remote.seconds(word, value)
            else:
                raise SystemExit(f"malai ssh: unknown option {word}\n{USAGE}")
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            if letter in WITH_VALUE:
                value = arg[j + 1:]
                if not value:
                    i += 1
                    if i >= len(args):
                        raise SystemExit(f"malai ssh: option -{letter} needs a value\n{USAGE}")
                    value = args[i]
                _option(call, letter, value)
                break
            if letter not in FLAGS:
                raise SystemExit(f"malai ssh: unknown option -{letter}\n{USAGE}")
            _option(call, letter, None)
            j += 1
        i += 1
    return args[i:]


def _option(call: SshCall, letter: str, value: Optional[str]) -> None:
    if letter == "N":
        call.no_command = True
    elif letter in REFUSED:
        raise SystemExit(f"malai ssh: {REFUSED[letter]}")
    elif letter == "D":
        call.dynamic = _socks_listen(value or "")
    elif letter == "t":
        call.tty += 1
    elif letter == "T":
        call.no_tty = True
    elif letter == "s":
        call.subsystem = True
    elif letter == "n":
        call.opts.stdin = False
    elif letter == "q":
        call.opts.quiet = True
    elif letter == "v":
        call.verbose += 1
    elif letter == "G":
        call.print_config = True
    elif letter == "V":
        print(f"malai ssh (malai {_version()}): ssh's command line over malai, not OpenSSH", file=sys.stderr)
        raise SystemExit(0)
    elif letter == "l":
        call.user = value
    elif letter == "p":
        call.port = value
    elif letter == "O":
        call.control = value
    elif letter == "e":
        call.opts.escape = _escape_char(value or "")
    elif letter == "o":
        assert value is not None
        _config_option(call, value)
    else:
        call.ignored.append(f"-{letter}" + (f" {value}" if value is not None else ""))


def _config_option(call: SshCall, text: str) -> None:
    """``-o Key=value`` (or ``Key value``, ``Key = value``): the ones that matter to malai."""
    text = text.strip()
    cut = min((i for i in (text.find("="), text.find(" "), text.find("\t")) if i >= 0), default=len(text))
    key, value = text[:cut].lower(), text[cut:].strip(" \t=").strip()
    if key in REFUSED_KEYS:
        raise SystemExit(f"malai ssh: -o {text[:cut]}: {REFUSED[REFUSED_KEYS[key]]}")
    if key == "connecttimeout":
        if value.lower() not in ("0", "none"):  # ssh's "no timeout": keep malai's bound
            call.opts.connect_timeout = _time(value)
    elif key == "requesttty":
        mode = value.lower()
        if mode not in ("yes", "no", "force", "auto"):
            raise SystemExit(f"malai ssh: -o RequestTTY={value}: give yes, no, force or auto")
        call.tty, call.no_tty = {"yes": 1, "force": 2}.get(mode, 0), mode == "no"
    elif key == "remotecommand":
        call.remote_command = None if value.lower() == "none" else value
    elif key == "sessiontype":
        call.no_command = value.lower() == "none"
        call.subsystem = value.lower() == "subsystem"
    elif key == "dynamicforward":
        call.dynamic = _socks_listen(value)
    elif key == "stdinnull":
        call.opts.stdin = value.lower() not in ("yes", "true")
    elif key == "forkafterauthentication" and value.lower() in ("yes", "true"):
        raise SystemExit(f"malai ssh: {REFUSED['f']}")
    elif key == "loglevel":
        call.opts.quiet = value.upper() == "QUIET"
        call.verbose = max(call.verbose, 1) if value.upper().startswith("DEBUG") else call.verbose
    elif key == "user":
        call.user = value
    elif key == "port":
        call.port = value
    else:
        call.ignored.append(f"-o {text}")


def _escape_char(value: str) -> Optional[bytes]:
    """``-e``: one character, ``^X`` for a control character, or ``none``."""
    if value == "none":
        return None
    if len(value) == 2 and value[0] == "^" and 64 <= ord(value[1].upper()) < 96:
        return bytes([ord(value[1].upper()) & 31])
    if len(value) != 1 or not value.isascii():
        raise SystemExit(f"malai ssh: -e {value}: give one character, ^X or none")
    return value.encode()


def _socks_listen(value: str) -> str:
    """ssh's ``[bind_address:]port`` (or ``bind/port``) as ``HOST:PORT``: loopback unless a
    bind address is given (``*`` or an empty one: every interface)."""
    bind, sep, port = value.replace("/", ":").rpartition(":")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise SystemExit(f"malai ssh: -D {value}: give [bind_address:]port")
    bind = bind.strip("[]")
    bind = {"": "0.0.0.0" if sep else "127.0.0.1", "*": "0.0.0.0", "localhost": "127.0.0.1"}.get(bind, bind)
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"


def _time(value: str) -> float:
    """ssh's time format: seconds, or with s, m, h suffixes (``1m30s``)."""
    total, number = 0.0, ""
    for c in value.lower():
        if c.isdigit() or c == ".":
            number += c
        elif c in "smh" and number:
            total += float(number) * {"s": 1, "m": 60, "h": 3600}[c]
            number = ""
        else:
            raise SystemExit(f"malai ssh: ConnectTimeout={value}: give seconds")
    total += float(number) if number else 0
    if total <= 0:
        raise SystemExit(f"malai ssh: ConnectTimeout={value}: give seconds")
    return total


def _host(call: SshCall, word: str) -> None:
    """``[user@]host`` or ``ssh://[user@]host[:port]``."""
    if word.startswith("ssh://"):
        word = word[len("ssh://"):].rstrip("/")
        if ":" in word.rpartition("@")[2]:
            word, _, port = word.rpartition(":")
            call.port = call.port or port
    user, at, host = word.rpartition("@")
    if at:
        if not user:
            raise SystemExit(f"malai ssh: {word!r}: nothing before the @\n{USAGE}")
        call.user = call.user or user  # as ssh: -l wins over user@
    call.host = host


def _version() -> str:
    import malai

    return malai.__version__


def main(argv: List[str], home: Path) -> int:
    try:
        call = parse(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return EXIT_SSH
        return e.code or 0
    if call.no_command:  # -N -D: the proxy alone, in the foreground
        from malai.cli import socks

        return socks.foreground(home, call.dynamic, call.verbose > 0, prefix="malai ssh", failed=EXIT_SSH)
    assert call.host is not None
    if call.print_config:  # git runs `ssh -G host` to learn whether this is an OpenSSH-like ssh
        print(f"host {call.host}\nhostname {call.host}\nuser {call.user or getpass.getuser()}\n"
              f"port {call.port or 22}\nconnecttimeout {call.opts.connect_timeout:g}")
        return 0
    if call.control is not None:
        if call.control in ("exit", "stop"):
            return 0
        print(f"malai ssh: -O {call.control}: malai has no control master (its daemon keeps the links)",
              file=sys.stderr)
        return EXIT_SSH
    target = remote.read_aliases(home).get(call.host, call.host)
    if " " in target.strip():
        print(f"malai ssh: alias {call.host!r} runs a command; malai ssh takes <machine>.<cluster> "
              "or an alias that names one", file=sys.stderr)
        return EXIT_SSH
    machine, _, cluster = target.strip().rpartition(".")
    if not machine or not cluster:
        print(f"malai ssh: {call.host!r}: give <machine>.<cluster> or an alias from malai.toml", file=sys.stderr)
        return EXIT_SSH
    opts = call.opts
    line = " ".join(call.words) if call.words else call.remote_command
    if call.subsystem:
        if not line:
            print("malai ssh: -s needs a subsystem name (sftp)", file=sys.stderr)
            return EXIT_SSH
        opts.subsystem = line
    elif line:
        opts.line = line
    opts.tty_mode = "no" if call.no_tty else ("force" if call.tty > 1 else "yes" if call.tty else "auto")
    if call.verbose:
        asked = (f"subsystem {opts.subsystem}" if opts.subsystem else f"command {opts.line!r}" if opts.line
                 else "a login shell")
        notes = [f"user {call.user} ignored (the machine's config says who runs)"] if call.user else []
        notes += [f"port {call.port} ignored"] if call.port else []
        notes += [f"{', '.join(call.ignored)} ignored"] if call.ignored else []
        print(f"malai ssh: {machine}.{cluster}: {asked}" + "".join(f"; {n}" for n in notes), file=sys.stderr)
    if call.dynamic is None:
        return remote.run_one(home, opts, cluster, machine, [])
    proxy = _start_socks(home, call.dynamic, opts.quiet)
    try:
        return remote.run_one(home, opts, cluster, machine, [])
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()


def _start_socks(home: Path, listen: str, quiet: bool) -> Optional[subprocess.Popen]:
    """``malai socks`` for the session's lifetime (-D with a session), or None (said why) when it did not start."""
    proxy = subprocess.Popen([sys.executable, "-c", "import sys; from malai.cli import main; sys.exit(main())",
                              "--home", str(home), "socks", "--listen", listen], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None)
    assert proxy.stdout is not None
    if proxy.stdout.readline():  # it listens
        proxy.stdout.close()
        return proxy
    proxy.wait()
    print(f"malai ssh: -D {listen}: the SOCKS proxy did not start; the session goes on without it", file=sys.stderr)
    return None


CP_USAGE = """usage: malai cp [-r] [-p] [-q] SRC… DEST
Copy files to and from machines: an operand <machine>.<cluster>:path is on that machine (relative to the
home of the user who runs there). scp in SFTP mode over `malai ssh -s sftp`: allow_files governs it; a
progress bar on a terminal (-q: none); -r copies folders, -p keeps times and modes."""


def copy(argv: List[str], home: Path) -> int:
    """``malai cp``: scp over malai-ssh (the machine's sftp server, under ``allow_files``)."""
    import os
    import shutil

    flags = []
    while argv and argv[0].startswith("-") and argv[0] != "--":
        if argv[0] in ("-h", "--help"):
            print(CP_USAGE)
            return 0
        if argv[0] not in ("-r", "-p", "-q"):
            print(f"malai cp: unknown option {argv[0]}\n{CP_USAGE}", file=sys.stderr)
            return remote.EXIT_USAGE
        flags.append(argv.pop(0))
    operands = argv[1:] if argv[:1] == ["--"] else argv
    if len(operands) < 2:
        print(CP_USAGE, file=sys.stderr)
        return remote.EXIT_USAGE
    scp = shutil.which("scp")
    helper = Path(sys.argv[0]).with_name("malai-ssh")
    if not os.access(helper, os.X_OK):
        helper = Path(shutil.which("malai-ssh") or helper)
    if scp is None or not os.access(helper, os.X_OK):
        missing = "scp (Debian: openssh-client)" if scp is None else "the malai-ssh program next to malai"
        print(f"malai cp: {missing} is not installed; it carries the copy", file=sys.stderr)
        return remote.EXIT_USAGE
    env = dict(os.environ, MALAI_HOME=str(home))
    try:
        return subprocess.call([scp, "-S", str(helper), *flags, "--", *operands], env=env)
    except KeyboardInterrupt:  # scp had it too
        return 130


def run() -> None:
    """The ``malai-ssh`` executable, for tools that take a program name without arguments."""
    from malai.paths import default_home

    sys.exit(main(sys.argv[1:], default_home()))
