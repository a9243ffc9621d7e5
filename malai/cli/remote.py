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
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import tty
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from malai import frames
from malai.ampbox import encode_box, read_box

__all__ = ["looks_like_target", "main"]

EXIT_DENIED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 126, 2, 255, 124
CONNECT_TIMEOUT = 10.0  # seconds to wait for room in the daemon's accept queue
STDOUT, STDERR = 1, 2
FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
ERROR_EXIT = {b"DENIED": EXIT_DENIED, b"UNKNOWN": EXIT_USAGE, b"UNREACHABLE": EXIT_UNREACHABLE}

USAGE = """usage: malai [--home DIR] [-t] [--timeout S] [--json] [--machines A,B] [--parallel N]
             <machine>.<cluster> | <alias> [command [args…]]

Run a command on a machine (no command: an interactive login shell).
  -t            allocate a terminal (raw mode here, a PTY there)
  --timeout S   kill the remote command after S seconds (exit 124)
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
        self.tty = False
        self.timeout: Optional[float] = None
        self.json = False
        self.machines: List[str] = []
        self.parallel = 16


def parse(argv: List[str]) -> Tuple[Options, str, List[str]]:
    opts = Options()
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if word == "-t":
            opts.tty = True
        elif word == "--json":
            opts.json = True
        elif word in ("--timeout", "--machines", "--parallel") and value is not None:
            i += 1
            try:
                if word == "--timeout":
                    opts.timeout = float(value)
                    if not 0 < opts.timeout < float("inf"):
                        raise SystemExit(f"malai: --timeout {value}: timeout must be a positive number of seconds")
                elif word == "--parallel":
                    opts.parallel = max(1, int(value))
                else:
                    opts.machines = [m for m in value.split(",") if m]
            except ValueError:
                raise SystemExit(f"malai: {word} {value!r}: not a number") from None
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
def connect(home: Path) -> Tuple[socket.socket, Optional[subprocess.Popen]]:
    """The daemon's control socket, or a socket pair to a direct-dial helper."""
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
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(CONNECT_TIMEOUT))
        try:
            s.connect(str(path))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
            return s, None
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()
        except BlockingIOError:
            s.close()
            raise ConnectionError(f"the daemon accepted no connection within {CONNECT_TIMEOUT:g}s "
                                  "(too many callers at once?); try again") from None
    ours, theirs = socket.socketpair()
    helper = subprocess.Popen([sys.executable, "-m", "malai.cli.direct", str(home), str(theirs.fileno())],
                              pass_fds=[theirs.fileno()])
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
            rows: int, cols: int, early: Optional[bytearray] = None) -> Optional[Tuple[int, str]]:
    """Send ``Exec``; None when accepted (frames that came with the answer go to ``early``),
    else (exit status, message)."""
    box = {b"_command": b"Exec", b"_ask": b"1", b"cluster": cluster.encode(), b"machine": machine.encode(),
           b"argv": _strings(argv), b"tty": b"True" if opts.tty else b"False",
           b"term": os.environ.get("TERM", "xterm").encode(), b"rows": str(rows).encode(),
           b"cols": str(cols).encode()}
    if opts.timeout is not None:
        box[b"timeout"] = repr(opts.timeout).encode()
    sock.sendall(encode_box(box))
    buffer = early if early is not None else bytearray()
    answer = read_box(sock, buffer)
    if b"_error" in answer:
        code = answer.get(b"_error_code", b"")
        return ERROR_EXIT.get(code, 1), answer.get(b"_error_description", b"").decode(errors="replace")
    return None


def run_one(home: Path, opts: Options, cluster: str, machine: str, argv: List[str]) -> int:
    interactive = opts.tty or not argv
    if interactive and not sys.stdin.isatty():
        interactive = opts.tty = False
    else:
        opts.tty = interactive
    rows, cols = _winsize()
    try:
        sock, helper = connect(home)
    except OSError as e:
        print(f"malai: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        early = bytearray()
        try:
            refused = request(sock, cluster, machine, argv, opts, rows, cols, early)
        except (ConnectionError, OSError) as e:
            print(f"malai: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE
        if refused is not None:
            code, message = refused
            print(f"malai: {message}", file=sys.stderr)
            return code
        return Session(sock, interactive, bytes(early)).run()
    finally:
        sock.close()
        if helper is not None:
            helper.wait()


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


class Session:
    """Pump stdin into frames and frames out to stdout/stderr until the exit frame.

    Never blocks on one direction: the socket is non-blocking, stdin is read only
    while little is queued for the socket, and output is read all the while (and
    written whole: the remote waits while our stdout does)."""

    MAX_QUEUED = 256 * 1024

    def __init__(self, sock: socket.socket, interactive: bool, early: bytes = b""):
        self.sock = sock
        self.interactive = interactive
        self.parser = frames.FrameParser()
        self.exit: Optional[int] = None
        self.queued = bytearray()
        self.early = early  # output that came with the answer: written once signals are forwarded

    def run(self) -> int:
        saved = None
        stdin = sys.stdin.fileno()
        if self.interactive:
            saved = termios.tcgetattr(stdin)
            tty.setraw(stdin)
        signal_r, signal_w = os.pipe()
        os.set_blocking(signal_w, False)
        previous = {s: signal.signal(s, lambda n, f: os.write(signal_w, bytes([n]))) for s in
                    ((signal.SIGWINCH,) if self.interactive else FORWARD + (signal.SIGWINCH,))}
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
                timeout = 0 if stdin_state == "file" and len(self.queued) < self.MAX_QUEUED else None
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
                            self._queue(frames.winsize_frame(*_winsize()) if n == signal.SIGWINCH
                                        else frames.encode(frames.SIGNAL, str(n).encode()))
            return self.exit
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
                write_all(STDOUT, payload)
            elif kind == frames.STDERR:
                write_all(STDERR, payload)
            elif kind == frames.ERROR:
                write_all(STDERR, b"malai: " + payload + b"\r\n")
            elif kind == frames.EXIT:
                self.exit = json.loads(payload)["code"]

    def _lost(self) -> int:
        write_all(STDERR, b"\r\nmalai: the connection to the machine was lost\n")
        return EXIT_UNREACHABLE


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
                sock, helper = connect(home)
                fan.helper = helper
                refused = request(sock, cluster, name, argv, opts, 24, 80, early)
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
