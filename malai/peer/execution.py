"""The machine's side of remote commands: authorise, spawn, stream, audit.

``prepare`` decides (ACL against the verified caller, run-as user from config)
and builds the argv and environment; ``ExecSession`` is the protocol the link
switches to: it spawns the process in its own process group and relays
frames, with each side paused when the other cannot keep up.
"""

import math
import os
import pwd
import shlex
import shutil
import signal
import struct
import time
from typing import Any, Dict, List, Optional

import attrs
from twisted.internet import fdesc, process
from twisted.internet.interfaces import IPushProducer
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from malai import frames
from malai.acl import Acl, Decision, Denied, run_as
from malai.audit import AuditLog
from malai.config.models import MachineConfig
from malai.errors import MalaiError
from malai.peer.shellwords import NeedsShell, Split, split_command

__all__ = ["BadRequest", "ExecRequest", "ExecSession", "caller_name", "check_request", "prepare"]

FORWARDED_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGKILL,
                     signal.SIGUSR1, signal.SIGUSR2}
KILL_GRACE = 2.0
SIGNAL_TRIES = 100  # x 10 ms: how long a signal waits for a new process's group
MALFORMED = "malformed exec frame"


class BadRequest(MalaiError):
    """Session parameters no client sends; the message is short enough for the caller."""


def check_request(argv: List[str], term: str, rows: int, cols: int, timeout: Optional[float],
                  line: Optional[str] = None, subsystem: Optional[str] = None) -> None:
    """Refuse parameters that could not be honoured, before anything is decided or spawned."""
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise BadRequest("invalid request: timeout must be a positive number of seconds")
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise BadRequest("invalid request: rows and cols must be 0 to 65535")
    if any("\x00" in word for word in [*argv, term, line or "", subsystem or ""]):
        raise BadRequest("invalid request: a NUL character in the command or TERM")
    if sum(1 for asked in (argv, line is not None, subsystem is not None) if asked) > 1:
        raise BadRequest("invalid request: give an argv, a command line or a subsystem, not two of them")
    if subsystem is not None and subsystem not in SUBSYSTEMS:
        raise BadRequest(f"invalid request: no subsystem {subsystem[:40]!r} here; there is {', '.join(SUBSYSTEMS)}")


@attrs.frozen
class ExecRequest:
    """A decided, ready-to-spawn request."""

    caller: str
    caller_name: str
    cluster: str
    argv: List[str]  # what the caller asked for
    command: List[str]  # what runs
    user: str
    uid: Optional[int]
    gid: Optional[int]
    home: str
    env: Dict[str, str]
    tty: bool
    rows: int
    cols: int
    timeout: Optional[float]
    decision: Decision


def prepare(config: Optional[MachineConfig], cluster: str, caller: str, argv: List[str], tty: bool,
            term: str, rows: int, cols: int, timeout: Optional[float], line: Optional[str] = None,
            subsystem: Optional[str] = None) -> ExecRequest:
    """Check, authorise and resolve a request; raise ``BadRequest``, ``Denied`` (with the explanation)
    or MalaiError.

    ``argv`` runs as it is; ``line`` (ssh's command string) runs as the argv it splits into (see
    malai.peer.shellwords) or, when it needs a shell, as ``$SHELL -c line`` where a login shell may
    run; ``subsystem`` (``sftp``) runs the machine's sftp server where ``allow_files`` allows."""
    check_request(argv, term, rows, cols, timeout, line, subsystem)
    if config is None:
        reason = "this machine has no config from its manager yet"
        raise Denied(Decision(False, "machine.toml", reason, reason))
    acl = Acl.for_machine(config)
    machine = config.machine
    split: Optional[Split] = Split(list(argv))
    needs_shell = ""
    if line is not None:
        try:
            split = split_command(line)
        except NeedsShell as e:
            split, needs_shell = None, str(e)
    if subsystem is not None:
        decision = acl.can_use_files(machine, caller)
    elif split is None:
        decision = acl.can_run_in_shell(machine, caller, needs_shell)
    else:
        decision = acl.can_run(machine, caller, split.words)
    if not decision:
        raise Denied(decision)
    words = split.words if split is not None and subsystem is None else []
    user = run_as(machine, words) or pwd.getpwuid(os.getuid()).pw_name
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise MalaiError(f"cannot run as {user!r}: no such user on this machine") from None
    uid = gid = None
    if pw.pw_uid != os.getuid():
        if os.getuid() != 0:
            raise MalaiError(f"cannot run as {user!r}: the daemon runs as "
                             f"{pwd.getpwuid(os.getuid()).pw_name}, not root")
        uid, gid = pw.pw_uid, pw.pw_gid
    shell = pw.pw_shell or "/bin/sh"
    if subsystem is not None:
        asked, command = ["-s", subsystem], [_sftp_server()]
    elif split is None:
        assert line is not None  # only a command line can need a shell
        asked, command = [line], [shell, "-c", line]
    else:
        asked = split.expanded(pw.pw_dir)
        entry = machine.commands.get(asked[0]) if asked else None
        if entry is not None:
            command = ["/bin/sh", "-c", entry.command, entry.name, *asked[1:]] if entry.shell \
                else [*shlex.split(entry.command), *asked[1:]]
        else:
            command = list(asked) or [shell, "-l"]
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": pw.pw_dir,
           "USER": user, "LOGNAME": user, "LANG": os.environ.get("LANG", "C.UTF-8"), "MALAI_CLIENT_ID52": caller}
    if tty:
        env["TERM"] = term or "xterm"
    return ExecRequest(caller, caller_name(config, caller), cluster, asked, command, user, uid, gid, pw.pw_dir, env,
                       tty, rows, cols, timeout, decision)


#: Where sftp servers live: Debian and Ubuntu, Fedora and RHEL, SUSE, Arch, Alpine, the BSDs, Homebrew.
SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/lib/ssh/sftp-server",
                "/usr/libexec/ssh/sftp-server", "/usr/lib/misc/sftp-server", "/usr/libexec/sftp-server",
                "/usr/local/libexec/sftp-server", "/opt/homebrew/libexec/sftp-server")
SUBSYSTEMS = ("sftp",)


def _sftp_server() -> str:
    for path in SFTP_SERVERS:
        if os.access(path, os.X_OK):
            return path
    raise MalaiError("this machine has no sftp server; install it (Debian: openssh-sftp-server, "
                     "Fedora: openssh-server)")


def caller_name(config: MachineConfig, caller: str) -> str:
    for name, id52 in config.callers.items():
        if id52 == caller:
            return name
    return ""


def _executable(command: List[str], env: Dict[str, str]) -> Optional[str]:
    found = shutil.which(command[0], path=env["PATH"]) if "/" not in command[0] else command[0]
    return found if found and os.access(found, os.X_OK) else None


class ExecSession(Protocol):
    """The exec link after the switch: frames in, frames out, one process group.

    A malformed frame ends this session only: an error frame to the caller, the group hung up.
    Once the exit frame is sent or the caller has gone, nothing more is written to the link."""

    log = Logger()

    def __init__(self, reactor, request: ExecRequest, audit: AuditLog):
        self.reactor = reactor
        self.request = request
        self.audit = audit
        self.parser = frames.FrameParser()
        self.process: Any = None
        self.pgid: Optional[int] = None  # kept after the leader is reaped: the group may outlive it
        self.running = False  # spawned, not yet ended
        self.finished = False  # exit frame sent or caller gone
        self.stdin_closed = False
        self.hung_up = False
        self.started = time.time()
        self.bytes_in = self.bytes_out = 0
        self.exit_code: Optional[int] = None
        self.timed_out = False
        self._timer = None
        self._kill_timer = None
        self._signal_retry = None  # a signal waiting for the process group to exist

    def connectionMade(self) -> None:
        r = self.request
        executable = _executable(r.command, r.env)
        if executable is None:
            self._finish(127, f"{r.command[0]}: command not found")
            return
        argv = r.command if r.tty else [_SETSID, *r.command]
        if not r.tty:
            executable = _SETSID
        try:
            self.process = _spawn(self.reactor, _Process(self), executable, argv, r.env,
                                  r.home if os.path.isdir(r.home) else "/", r.uid, r.gid, r.tty)
        except OSError as e:
            self._finish(126, f"cannot start {r.command[0]}: {e.strerror or e}")
            return
        self.pgid, self.running = self.process.pid, True  # setsid (or the PTY's) makes it the group leader
        if r.tty:
            self._resize(r.rows, r.cols)
        self.transport.registerProducer(_ChildOutput(self), True)  # a slow caller pauses the child's output
        writer = self.process if r.tty else self.process.pipes.get(0)
        if writer is not None:
            writer.registerProducer(_CallerInput(self.transport), True)  # a child not reading stdin pauses the caller
        if r.timeout is not None:
            self._timer = self.reactor.callLater(r.timeout, self._time_out)
        self.log.info("{cluster}: {caller} runs {argv} as {user} (pid {pid})", cluster=r.cluster,
                      caller=r.caller_name or r.caller, argv=r.command, user=r.user, pid=self.pgid)

    def _finish(self, code: int, error: str = "", signum: int = 0) -> None:
        """Send ``error`` (if any) and the exit frame, and close; once, and only while the caller is there."""
        if self.finished:
            return
        self.finished = True
        self.exit_code = code
        self.transport.unregisterProducer()
        self.transport.write((frames.encode(frames.ERROR, error.encode()) if error else b"")
                             + frames.exit_frame(code, signum))
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            for kind, payload in self.parser.feed(data):
                self._frame(kind, payload)
        except ValueError as e:
            self.log.warn("{cluster}: {caller} sent a malformed exec frame ({e}); session closed",
                          cluster=self.request.cluster, caller=self.request.caller, e=e)
            self._finish(126, MALFORMED)
            self._hang_up()

    def _frame(self, kind: bytes, payload: bytes) -> None:
        """One frame from the caller; ValueError for anything a client does not send."""
        if kind == frames.STDIN:
            if self.stdin_closed:
                raise ValueError("stdin after its end")
            self.bytes_in += len(payload)
            self.process.write(payload)
        elif kind == frames.EOF:
            if self.request.tty:
                self.process.write(b"\x04")
            elif not self.stdin_closed:
                self.stdin_closed = True
                stdin = self.process.pipes.get(0)
                if stdin is not None:
                    stdin.unregisterProducer()  # else it never closes while the link is its producer
                self.process.closeStdin()
        elif kind == frames.SIGNAL:
            signum = int(payload)
            if signum in FORWARDED_SIGNALS:
                self._signal(signum)
        elif kind == frames.WINSIZE:
            if len(payload) != 4:
                raise ValueError(f"window size frame of {len(payload)} bytes")
            if self.request.tty:
                self._resize(*struct.unpack(">HH", payload))
        else:
            raise ValueError(f"frame kind {kind!r}")

    def _signal(self, signum: int, tries: int = SIGNAL_TRIES) -> None:
        """``signum`` to the process group while it may still exist."""
        if self.pgid is None or not self.running:
            return
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            # Spawned a moment ago (an exec stream is answered at once): the child has not made its
            # process group yet (setsid), and signalling it before its exec would hit the daemon's
            # own handlers in the forked child. Try again in a moment.
            if tries and self._signal_retry is None:
                self._signal_retry = self.reactor.callLater(0.01, self._retry_signal, signum, tries - 1)
        except PermissionError:
            pass

    def _retry_signal(self, signum: int, tries: int) -> None:
        self._signal_retry = None
        self._signal(signum, tries)

    def _resize(self, rows: int, cols: int) -> None:
        import fcntl
        import termios

        try:
            fcntl.ioctl(self.process.fileno(), termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except (OSError, ValueError):  # the terminal is gone already
            return
        self._signal(signal.SIGWINCH)

    def _time_out(self) -> None:
        self._timer = None
        self.timed_out = True
        self._signal(signal.SIGTERM)
        self._kill_later()

    def _hang_up(self) -> None:
        """The caller is gone (or sent garbage): SIGHUP now, SIGKILL after the grace period.
        The output keeps flowing (nowhere) so that the end of the group is noticed."""
        if self.hung_up or not self.running:
            return
        self.hung_up = True
        self._signal(signal.SIGHUP)
        self.process.resumeProducing()
        self._kill_later()

    def _kill_later(self) -> None:
        if self._kill_timer is None:
            self._kill_timer = self.reactor.callLater(KILL_GRACE, self._signal, signal.SIGKILL)

    def output(self, kind: bytes, data: bytes) -> None:
        if self.finished:
            return
        self.bytes_out += len(data)
        self.transport.write(frames.encode(kind, data))

    def ended(self, code: Optional[int], signum: Optional[int]) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
            self._signal(signal.SIGKILL)  # being stopped: what is left of the group goes with its leader
        self.running = False
        if self._signal_retry is not None and self._signal_retry.active():
            self._signal_retry.cancel()
        self._signal_retry = None
        self._finish(124 if self.timed_out else (128 + signum if signum else (code or 0)), signum=signum or 0)

    def connectionLost(self, reason=None) -> None:
        self.finished = True
        self._hang_up()
        r = self.request
        self.audit.record(cluster=r.cluster, caller=r.caller, caller_name=r.caller_name, argv=r.argv,
                          command=r.command, user=r.user, decision="allowed", rule=str(r.decision),
                          exit=self.exit_code, duration=round(time.time() - self.started, 3),
                          bytes_in=self.bytes_in, bytes_out=self.bytes_out)


_SETSID = shutil.which("setsid") or "/usr/bin/setsid"

#: One read of a child's output: a whole pipe buffer, and with its 5-byte exec frame header one full
#: DATA frame of the link (64 KiB). Twisted's readers take 8 KiB a time, so 8 events, 8 frames,
#: 8 stream writes and 8 writes to TLS for what is here one of each (docs/exec.md, "Where the time goes").
READ_SIZE = (1 << 16) - 5


class _WideReader(process.ProcessReader):
    """A child's stdout or stderr, read ``READ_SIZE`` bytes at a time."""

    def doRead(self):
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return fdesc.CONNECTION_LOST
        if not data:
            return fdesc.CONNECTION_DONE
        self.dataReceived(data)
        return None


class _WideProcess(process.Process):
    """A child with pipes whose output is read in ``READ_SIZE`` chunks."""

    processReaderFactory = _WideReader


def _spawn(reactor, proto, executable, argv, env, path, uid, gid, tty):
    """``reactor.spawnProcess``, with wide reads of the output pipes where the reactor is a POSIX one
    (a terminal is read as Twisted reads it: interactive output comes in a few KiB; a test's fake
    reactor spawns its own way)."""
    if tty or not isinstance(reactor, PosixReactorBase):
        return reactor.spawnProcess(proto, executable, argv, env=env, path=path, uid=uid, gid=gid, usePTY=tty)
    return _WideProcess(reactor, executable, argv, env, path, proto, uid, gid, None)


@implementer(IPushProducer)
class _CallerInput:
    """The link as a producer for the child's stdin; closing stdin must not close the link."""

    def __init__(self, transport):
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.resumeProducing()  # stdin is closed; the link goes on for output


@implementer(IPushProducer)
class _ChildOutput:
    """The child's output pipes (or PTY) as a producer for the link."""

    def __init__(self, session: ExecSession):
        self.session = session

    def pauseProducing(self) -> None:
        self.session.process.pauseProducing()

    def resumeProducing(self) -> None:
        self.session.process.resumeProducing()

    def stopProducing(self) -> None:
        self.session._hang_up()


class _Process(ProcessProtocol):
    def __init__(self, session: ExecSession):
        self.session = session

    def outReceived(self, data: bytes) -> None:
        self.session.output(frames.STDOUT, data)

    def errReceived(self, data: bytes) -> None:
        self.session.output(frames.STDERR, data)

    def processEnded(self, reason) -> None:
        value = reason.value
        self.session.ended(getattr(value, "exitCode", None), getattr(value, "signal", None))
