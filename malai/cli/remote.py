"""``malai [options] <machine>.<cluster> [command…]``: run commands on machines.

Stdlib only: through a running daemon this path must not import Twisted. The
daemon opens the peer link; this process speaks one AMP box (``Exec``) on the
control socket and then exec frames (malai.frames). With no daemon running,
a helper process (``python -m malai.cli.direct``) plays the daemon's part
over a socket pair.
"""

import fnmatch
import json
import os
import re
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time
import tty
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from malai import frames
from malai.ampbox import encode_box, read_box

__all__ = ["looks_like_target", "main"]

EXIT_DENIED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 126, 2, 255, 124
EXIT_READER_GONE = 128 + signal.SIGPIPE  # our stdout's reader left first, as a local writer would end
CONNECT_TIMEOUT = 10.0  # seconds until the machine has answered (and for room in the daemon's accept queue)
TIMEOUT_GRACE = 3.0  # past --timeout: the machine's TERM, KILL after 2 s, and its exit frame on the way
STDOUT, STDERR = 1, 2
FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
ERROR_EXIT = {b"DENIED": EXIT_DENIED, b"UNKNOWN": EXIT_USAGE, b"UNREACHABLE": EXIT_UNREACHABLE}

USAGE = """usage: malai [--home DIR] [-t] [--timeout S] [--connect-timeout S] [--json] [--machines A,B]
             [--parallel N] <machine>.<cluster> | <alias> [command [args…]]
       malai ssh [ssh options] <machine>.<cluster> [command string…]   (see docs/ssh.md)

Run a command on a machine (no command: a login shell, with a terminal when stdin is one).
  -t            allocate a terminal (a PTY there; raw mode here when stdin is a terminal)
  --timeout S   kill the remote command after S seconds (exit 124); connecting counts
  --connect-timeout S  give up when the machine has not answered after S seconds (default 10; exit 255)
  --json        fan-out: one JSON object per output chunk, then one per exit
  --machines A,B  fan-out to these machines of the cluster ('*.<cluster>' for all, 'web*.<cluster>' to match)
  --parallel N  fan-out: at most N machines at once (default 16)
Exit status: the remote one (128+N for death by signal N); 126 denied, 2 unknown machine, 255 unreachable."""


def looks_like_target(word: str, aliases: Dict[str, str]) -> bool:
    return word in aliases or ("." in word and not word.startswith("-"))


def read_aliases(home: Path) -> Dict[str, str]:
    import tomllib

    try:
        with open(home / "malai.toml", "rb") as f:
            aliases = tomllib.load(f).get("aliases", {})
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return {}
    return {k: v for k, v in aliases.items() if isinstance(v, str)}


class Options:
    def __init__(self) -> None:
        self.tty = False  # a terminal on the machine: run_one decides it from tty_mode
        self.tty_mode = "auto"  # auto (with no command and stdin a terminal), no, yes (if stdin is one), force
        self.timeout: Optional[float] = None
        self.connect_timeout = CONNECT_TIMEOUT
        self.json = False
        self.machines: List[str] = []
        self.parallel = 16
        self.line: Optional[str] = None  # ssh's command string, instead of an argv
        self.subsystem: Optional[str] = None  # ssh -s: ``sftp``
        self.stdin = True  # False: send no input (ssh -n)
        self.quiet = False  # no warnings (ssh -q)
        self.escape: Optional[bytes] = b"~"  # ssh's escape character with a terminal (-e; None: none)


def seconds(word: str, value: str) -> float:
    """A positive, finite number of seconds, or SystemExit naming the option."""
    try:
        number = float(value)
    except ValueError:
        raise SystemExit(f"malai: {word} {value!r}: not a number") from None
    if not 0 < number < float("inf"):
        raise SystemExit(f"malai: {word} {value}: timeout must be a positive number of seconds")
    return number


def parse(argv: List[str]) -> Tuple[Options, str, List[str]]:
    opts = Options()
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if word == "-t":
            opts.tty_mode = "force"
        elif word == "--json":
            opts.json = True
        elif word in ("--timeout", "--connect-timeout", "--machines", "--parallel") and value is not None:
            i += 1
            if word == "--timeout":
                opts.timeout = seconds(word, value)
            elif word == "--connect-timeout":
                opts.connect_timeout = seconds(word, value)
            elif word == "--parallel":
                try:
                    opts.parallel = max(1, int(value))
                except ValueError:
                    raise SystemExit(f"malai: {word} {value!r}: not a number") from None
            else:
                opts.machines = [m for m in value.split(",") if m]
        elif word in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        else:
            raise SystemExit(f"malai: unknown option {word}\n{USAGE}")
        i += 1
    if i >= len(argv):
        raise SystemExit(USAGE)
    return opts, argv[i], argv[i + 1:]


def main(argv: List[str], home: Path) -> int:
    try:
        opts, target, command = parse(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return EXIT_USAGE
        return e.code or 0
    aliases = read_aliases(home)
    if target in aliases:
        words = aliases[target].split()
        target, command = words[0], words[1:] + command
    machine, _, cluster = target.rpartition(".")
    if not machine or not cluster:
        print(f"malai: {target!r}: give <machine>.<cluster> or an alias from malai.toml", file=sys.stderr)
        return EXIT_USAGE
    if opts.machines or any(c in machine for c in "*?["):
        return fan_out(home, opts, machine, cluster, command)
    return run_one(home, opts, cluster, machine, command)


# -- talking to the daemon (or the direct helper) -------------------------------------
def connect(home: Path, timeout: Optional[float] = None) -> Tuple[socket.socket, Optional[subprocess.Popen]]:
    """The daemon's control socket, or a socket pair to a direct-dial helper."""
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    path = home / "malai.socket"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ConnectionError(f"{path}: not a private socket of yours; refusing to use it")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A blocking connect waits while the daemon's accept queue is full; this bounds the wait.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
        try:
            s.connect(str(path))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
            return s, None
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()
        except BlockingIOError:
            s.close()
            raise ConnectionError(f"the daemon accepted no connection within {timeout:g}s "
                                  "(too many callers at once?); try again") from None
    ours, theirs = socket.socketpair()
    # A session of its own: the terminal's Ctrl-C is ours to forward or act on; the helper ends with its socket.
    helper = subprocess.Popen([sys.executable, "-m", "malai.cli.direct", str(home), str(theirs.fileno())],
                              pass_fds=[theirs.fileno()], start_new_session=True)
    theirs.close()
    return ours, helper


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))


def _strings(items: List[str]) -> bytes:
    out = bytearray()
    for item in items:
        data = item.encode()
        out += struct.pack(">H", len(data)) + data
    return bytes(out)


def request(sock: socket.socket, cluster: str, machine: str, argv: List[str], opts: Options,
            rows: int, cols: int, early: Optional[bytearray] = None,
            deadline: Optional[float] = None) -> Optional[Tuple[int, str]]:
    """Send ``Exec``; None when accepted (frames that came with the answer go to ``early``),
    else (exit status, message). ``TimeoutError`` when no answer came by ``deadline`` (monotonic)."""
    box = {b"_command": b"Exec", b"_ask": b"1", b"cluster": cluster.encode(), b"machine": machine.encode(),
           b"argv": _strings(argv), b"tty": b"True" if opts.tty else b"False",
           b"term": os.environ.get("TERM", "xterm").encode(), b"rows": str(rows).encode(),
           b"cols": str(cols).encode()}
    if opts.timeout is not None:
        box[b"timeout"] = repr(opts.timeout).encode()
    if opts.line is not None:
        box[b"line"] = opts.line.encode()
    if opts.subsystem is not None:
        box[b"subsystem"] = opts.subsystem.encode()
    sock.sendall(encode_box(box))
    buffer = early if early is not None else bytearray()
    if deadline is not None:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        answer = read_box(sock, buffer)
    except socket.timeout:
        raise TimeoutError from None
    finally:
        sock.settimeout(None)
    if b"_error" in answer:
        code = answer.get(b"_error_code", b"")
        return ERROR_EXIT.get(code, 1), answer.get(b"_error_description", b"").decode(errors="replace")
    return None


def run_one(home: Path, opts: Options, cluster: str, machine: str, argv: List[str]) -> int:
    name = f"{machine}.{cluster}"
    stdin_tty = _isatty(0)
    has_command = bool(argv) or opts.line is not None or opts.subsystem is not None
    mode = opts.tty_mode
    opts.tty = mode == "force" or (stdin_tty and (mode == "yes" or (mode == "auto" and not has_command)))
    if mode == "yes" and not stdin_tty and not opts.quiet:
        print("malai: no terminal on the machine: stdin is not a terminal (-tt forces one)", file=sys.stderr)
    rows, cols = _winsize()
    start = time.monotonic()
    bound, why = opts.connect_timeout, "the connect timeout"
    if opts.timeout is not None and opts.timeout < bound:
        bound, why = opts.timeout, "--timeout"
    sock = helper = None
    try:
        sock, helper = connect(home, opts.connect_timeout)
        early = bytearray()
        refused = request(sock, cluster, machine, argv, opts, rows, cols, early, start + bound)
        if refused is not None:
            code, message = refused
            print(f"malai: {named(home, cluster, message)}", file=sys.stderr)
            return code
        deadline = None if opts.timeout is None else start + opts.timeout + TIMEOUT_GRACE
        escape = Escapes(opts.escape) if opts.tty and stdin_tty and opts.escape else None
        return Session(sock, opts.tty and stdin_tty, bytes(early), name, deadline, opts.stdin, escape).run()
    except TimeoutError:
        print(f"malai: {name} did not answer within {bound:g}s ({why}); tried {tried(home, cluster, machine)}. "
              f"Is it up and reachable from here? `malai ping {name}` tells more", file=sys.stderr)
        return EXIT_UNREACHABLE
    except OSError as e:
        print(f"malai: {name}: {e.strerror or e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print(f"malai: interrupted while connecting to {name}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if sock is not None:
            sock.close()
        if helper is not None:
            _reap(helper)


def _reap(helper: subprocess.Popen) -> None:
    """The direct helper ends when its socket closes; one still dialing is stopped."""
    try:
        helper.wait(2)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()


def known_peers(home: Path, cluster: str) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """From this device's config of ``cluster``: names by ID52, and addresses by machine name."""
    import tomllib

    names: Dict[str, str] = {}
    addrs: Dict[str, List[str]] = {}
    for file, tables in (("machine.toml", ("directory", "relay", "machine")), ("cluster.toml", ("machine",))):
        try:
            with open(home / "clusters" / cluster / file, "rb") as f:
                config = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError):
            continue
        names[str(config.get("cluster_manager", {}).get("id52"))] = "manager"
        for table in tables:
            for name, entry in config.get(table, {}).items():
                if isinstance(entry, dict):
                    names[str(entry.get("id52"))] = name
                    addrs.setdefault(name, []).extend(str(a) for a in entry.get("addrs", []))
    return names, addrs


def named(home: Path, cluster: str, text: str) -> str:
    """``text`` with the ID52s this device knows replaced by their machine names."""
    if not re.search(r"\b[a-z0-9]{52}\b", text):
        return text
    names = known_peers(home, cluster)[0]
    return re.sub(r"\b[a-z0-9]{52}\b", lambda m: names.get(m.group(0), m.group(0)), text)


def tried(home: Path, cluster: str, machine: str) -> str:
    """What the daemon dials for ``machine``, from this device's config, for a message."""
    hints = known_peers(home, cluster)[1].get(machine, [])
    return ", ".join(hints) + " through the daemon" if hints else "through the daemon (no address in the config)"


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _winsize() -> Tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
        return size.lines, size.columns
    except OSError:
        return 24, 80


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd``, waiting while it is full: a caller such as
    rsync may hand us a non-blocking stdout, where a plain write would drop the rest."""
    view = memoryview(data)
    poller = None
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            poller.poll()


class ReaderGone(Exception):
    """Our stdout's reader has left (``| head``)."""


class Escaped(Exception):
    """``~.`` was typed at the start of a line."""


class Escapes:
    """ssh's escapes in what a terminal types: at the start of a line (after CR or LF, or the
    very first key) ``~.`` ends the session and ``~~`` sends one ``~``; ``~`` and any other key
    go as they are."""

    def __init__(self, char: bytes = b"~"):
        self.char = char[0]
        self.line_start = True
        self.pending = False  # an escape character at the start of a line, waiting for the next key

    def feed(self, data: bytes) -> Tuple[bytes, bool]:
        """(what to send, whether ``~.`` came: then nothing after it is sent)."""
        if not self.pending and self.char not in data:  # the common case, a paste included
            self.line_start = data[-1:] in (b"\r", b"\n") if data else self.line_start
            return data, False
        out = bytearray()
        for key in data:
            if self.pending:
                self.pending = False
                if key == ord("."):
                    return bytes(out), True
                if key != self.char:
                    out.append(self.char)
            elif self.line_start and key == self.char:
                self.pending = True
                continue
            out.append(key)
            self.line_start = key in b"\r\n"
        return bytes(out), False


class Session:
    """Pump stdin into frames and frames out to stdout/stderr until the exit frame.

    Never blocks on one direction: the socket is non-blocking, stdin is read only
    while little is queued for the socket, and output is read all the while (and
    written whole: the remote waits while our stdout does). Never waits past
    ``deadline``; a second INT, TERM or HUP (the first goes to the command) ends it here."""

    MAX_QUEUED = 256 * 1024

    def __init__(self, sock: socket.socket, interactive: bool, early: bytes = b"", name: str = "the machine",
                 deadline: Optional[float] = None, stdin: bool = True, escape: Optional[Escapes] = None):
        self.sock = sock
        self.interactive = interactive
        self.parser = frames.FrameParser()
        self.exit: Optional[int] = None
        self.queued = bytearray()
        self.early = early  # output that came with the answer: written once signals are forwarded
        self.name = name
        self.deadline = deadline  # monotonic: --timeout and its grace have passed
        self.use_stdin = stdin
        self.signalled = False  # a signal went to the command already
        self.closed: set = set()  # our outputs whose reader has left
        self.escape = escape  # a terminal's keys: ~. leaves

    def run(self) -> int:
        saved = None
        stdin = sys.stdin.fileno() if sys.stdin is not None else -1
        if self.interactive:
            saved = termios.tcgetattr(stdin)
            tty.setraw(stdin)
        signal_r, signal_w = os.pipe()
        os.set_blocking(signal_w, False)
        previous = {s: signal.signal(s, lambda n, f: os.write(signal_w, bytes([n])))
                    for s in FORWARD + (signal.SIGWINCH,)}
        self.sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "sock")
        sel.register(signal_r, selectors.EVENT_READ, "signal")
        stdin_state = self._stdin_kind(sel, stdin)
        try:
            self._handle(self.early)
            while self.exit is None:
                want_stdin = stdin_state != "closed" and len(self.queued) < self.MAX_QUEUED
                if stdin_state == "file" and want_stdin:
                    stdin_state = "file" if self._read_stdin(stdin) else "closed"
                    want_stdin = False
                self._interest(sel, stdin, stdin_state == "pollable" and want_stdin)
                timeout: Optional[float] = 0 if stdin_state == "file" and len(self.queued) < self.MAX_QUEUED else None
                if self.deadline is not None:
                    left = self.deadline - time.monotonic()
                    if left <= 0:
                        return self._leave(f"--timeout passed and {self.name} did not end the command", EXIT_TIMEOUT)
                    timeout = left if timeout is None else min(timeout, left)
                for key, mask in sel.select(timeout):
                    if key.data == "sock":
                        if mask & selectors.EVENT_WRITE:
                            self._flush()
                        if mask & selectors.EVENT_READ and not self._from_remote():
                            return self.exit if self.exit is not None else self._lost()
                    elif key.data == "stdin":
                        if not self._read_stdin(stdin):
                            sel.unregister(stdin)
                            stdin_state = "closed"
                    elif key.data == "signal":
                        for n in os.read(signal_r, 64):
                            if n == signal.SIGWINCH:
                                self._queue(frames.winsize_frame(*_winsize()))
                            elif self.interactive or self.signalled:  # a terminal sends keys, not signals
                                return self._leave(f"{signal.Signals(n).name}: left {self.name} (the command "
                                                   "there is hung up)", 128 + n)
                            else:
                                self.signalled = True
                                self._queue(frames.encode(frames.SIGNAL, str(n).encode()))
            return self.exit
        except ReaderGone:
            return self._reader_gone()
        except Escaped:
            return self._leave(f"~.: left {self.name} (the command there is hung up)", EXIT_UNREACHABLE)
        except (BrokenPipeError, ConnectionResetError):
            return self._drain()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            os.close(signal_r)
            os.close(signal_w)

    def _stdin_kind(self, sel, stdin: int) -> str:
        try:
            if not self.use_stdin:
                raise ValueError("no stdin")
            sel.register(stdin, selectors.EVENT_READ, "stdin")
            return "pollable"
        except PermissionError:  # a regular file: always readable, epoll refuses it
            return "file"
        except (ValueError, OSError):  # no stdin
            self._queue(frames.encode(frames.EOF))
            return "closed"

    def _interest(self, sel, stdin: int, want_stdin: bool) -> None:
        sel.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.queued else 0), "sock")
        registered = stdin in sel.get_map()
        if want_stdin and not registered:
            sel.register(stdin, selectors.EVENT_READ, "stdin")
        elif not want_stdin and registered:
            sel.unregister(stdin)

    def _read_stdin(self, stdin: int) -> bool:
        data = os.read(stdin, 65536)
        if data and self.escape is not None:
            keys, left = self.escape.feed(data)
            if keys:
                self._queue(frames.encode(frames.STDIN, keys))
            if left:
                raise Escaped()
            return True
        self._queue(frames.encode(frames.STDIN, data) if data else frames.encode(frames.EOF))
        return bool(data)

    def _queue(self, frame: bytes) -> None:
        self.queued += frame
        self._flush()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.queued)
        except BlockingIOError:
            return
        del self.queued[:sent]

    def _drain(self) -> int:
        """Our side could not write: the session may have ended already, with its
        last frames (the exit status) still waiting to be read."""
        self.sock.setblocking(True)
        try:
            while self.exit is None and self._from_remote():
                pass
        except OSError:
            pass
        return self.exit if self.exit is not None else self._lost()

    def _from_remote(self) -> bool:
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return True
        if not data:
            return False
        self._handle(data)
        return True

    def _handle(self, data: bytes) -> None:
        for kind, payload in self.parser.feed(data):
            if kind == frames.STDOUT:
                self._write(STDOUT, payload)
            elif kind == frames.STDERR:
                self._write(STDERR, payload)
            elif kind == frames.ERROR:
                self._write(STDERR, b"malai: " + payload + b"\r\n")
            elif kind == frames.EXIT:
                self.exit = json.loads(payload)["code"]

    def _write(self, fd: int, data: bytes) -> None:
        """Write whole; ``ReaderGone`` once stdout's reader has left (stderr's is let go quietly)."""
        if fd in self.closed:
            return
        try:
            write_all(fd, data)
        except BrokenPipeError:
            self.closed.add(fd)
            if fd == STDOUT:
                raise ReaderGone() from None

    def _reader_gone(self) -> int:
        """``| head`` has what it wanted: end quietly, with the command's status if it has come
        already, else as a local writer would end (SIGPIPE); closing hangs the command up."""
        self.sock.setblocking(False)
        try:
            while self.exit is None:
                data = self.sock.recv(262144)
                if not data:
                    break
                self._handle(data)
        except OSError:  # nothing more waiting
            pass
        return self.exit if self.exit is not None else EXIT_READER_GONE

    def _leave(self, why: str, code: int) -> int:
        self._write(STDERR, f"\r\nmalai: {why}\n".encode())
        return code

    def _lost(self) -> int:
        return self._leave(f"the connection to {self.name} was lost before the command ended", EXIT_UNREACHABLE)


# -- fan-out --------------------------------------------------------------------------
def machines_of(home: Path, cluster: str) -> List[str]:
    sock, helper = connect(home)
    try:
        sock.sendall(encode_box({b"_command": b"Machines", b"_ask": b"1", b"cluster": cluster.encode()}))
        answer = read_box(sock, bytearray())
    finally:
        sock.close()
        if helper is not None:
            helper.terminate()
            helper.wait()
    if b"_error" in answer:
        raise LookupError(answer.get(b"_error_description", b"").decode())
    # a Chunked value (malai.peer.commands): the count of parts, then machines.0, machines.1…
    data, names = b"".join(answer[b"machines.%d" % i] for i in range(int(answer[b"machines"]))), []
    while data:
        (n,) = struct.unpack_from(">H", data)
        names.append(data[2:2 + n].decode())
        data = data[2 + n:]
    return names


def fan_out(home: Path, opts: Options, pattern: str, cluster: str, argv: List[str]) -> int:
    try:
        known = machines_of(home, cluster)
    except (LookupError, OSError) as e:
        print(f"malai: {e}", file=sys.stderr)
        return EXIT_USAGE
    wanted = opts.machines or [m for m in known if fnmatch.fnmatchcase(m, pattern)]
    unknown = [m for m in wanted if m not in known]
    if unknown or not wanted:
        print(f"malai: no machine {', '.join(unknown) or pattern!r} in {cluster}; machines: "
              f"{', '.join(known) or 'none'}", file=sys.stderr)
        return EXIT_USAGE
    results: Dict[str, int] = {}
    pending = list(wanted)
    running: Dict[socket.socket, "_Fan"] = {}
    sel = selectors.DefaultSelector()
    opts.tty = False
    while pending or running:
        while pending and len(running) < opts.parallel:
            name = pending.pop(0)
            fan = _Fan(name, opts.json)
            early = bytearray()
            try:
                sock, helper = connect(home, opts.connect_timeout)
                fan.helper = helper
                refused = request(sock, cluster, name, argv, opts, 24, 80, early,
                                  time.monotonic() + opts.connect_timeout)
            except TimeoutError:
                sock.close()
                refused = (EXIT_UNREACHABLE, f"did not answer within {opts.connect_timeout:g}s (the connect timeout)")
            except OSError as e:
                refused = (EXIT_UNREACHABLE, str(e))
            if refused is not None:
                fan.say_error(refused[1])
                results[name] = fan.finish(refused[0])
                continue
            try:
                sock.sendall(frames.encode(frames.EOF))  # fan-out commands get no stdin
            except OSError:
                pass  # it already finished: its frames are in `early` or still in the socket
            fan.feed(bytes(early))
            running[sock] = fan
            sel.register(sock, selectors.EVENT_READ)
        for key, _ in sel.select():
            sock = key.fileobj  # type: ignore[assignment]
            fan = running[sock]
            data = sock.recv(262144)
            if data:
                fan.feed(data)
            if not data or fan.exit is not None:
                sel.unregister(sock)
                sock.close()
                del running[sock]
                results[fan.name] = fan.finish(fan.exit if fan.exit is not None else EXIT_UNREACHABLE)
    failed = sorted(name for name, code in results.items() if code)
    summary = f"{len(results) - len(failed)} of {len(results)} machines succeeded"
    if failed:
        summary += "; failed: " + ", ".join(f"{n} (exit {results[n]})" for n in failed)
    print(summary, file=sys.stderr)
    return 0 if not failed else 1


class _Fan:
    """One machine's output in a fan-out: lines prefixed with its name, or JSON objects."""

    def __init__(self, name: str, as_json: bool):
        self.name = name
        self.json = as_json
        self.parser = frames.FrameParser()
        self.partial = {frames.STDOUT: b"", frames.STDERR: b""}
        self.exit: Optional[int] = None
        self.helper: Optional[subprocess.Popen] = None

    def feed(self, data: bytes) -> None:
        for kind, payload in self.parser.feed(data):
            if kind in (frames.STDOUT, frames.STDERR):
                self._output(kind, payload)
            elif kind == frames.ERROR:
                self.say_error(payload.decode(errors="replace"))
            elif kind == frames.EXIT:
                self.exit = json.loads(payload)["code"]

    def _output(self, kind: bytes, payload: bytes) -> None:
        stream = "stdout" if kind == frames.STDOUT else "stderr"
        if self.json:
            self._json({"machine": self.name, "stream": stream, "data": payload.decode(errors="replace")})
            return
        text = self.partial[kind] + payload
        *lines, self.partial[kind] = text.split(b"\n")
        prefix = self.name.encode() + b": "
        write_all(STDOUT if kind == frames.STDOUT else STDERR, b"".join(prefix + line + b"\n" for line in lines))

    def say_error(self, message: str) -> None:
        if self.json:
            self._json({"machine": self.name, "stream": "error", "data": message})
        else:
            write_all(STDERR, f"{self.name}: malai: {message}\n".encode())

    def finish(self, code: int) -> int:
        for kind, rest in self.partial.items():
            if rest:
                self._output(kind, b"\n")
        if self.json:
            self._json({"machine": self.name, "exit": code})
        if self.helper is not None:
            self.helper.wait()
        return code

    def _json(self, record: dict) -> None:
        write_all(STDOUT, (json.dumps(record) + "\n").encode())
