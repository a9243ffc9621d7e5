"""``malai daemon``, ``malai status``, ``malai stop``."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from malai.cli.common import home_of, print_json, run_twisted
from malai.control.commands import SUMMARY_LISTS
from malai.errors import MalaiError
from malai.home import Home
from malai.lock import DaemonLock
from malai.logs import DEFAULT_FILES, DEFAULT_SIZE

RUNNING, STARTING, NOT_ANSWERING = "RUNNING", "STARTING", "NOT ANSWERING"
NOT_RUNNING, STALE, CRASHED = "NOT RUNNING", "STALE", "CRASHED"
EXIT_NOT_RUNNING = 3
EXIT_CODES = {RUNNING: 0, NOT_ANSWERING: 1, STARTING: 4}  # else EXIT_NOT_RUNNING
#: How long after its start a daemon that has no control socket yet counts as starting.
STARTUP_WINDOW = 60.0
#: How long ``status`` waits for the daemon's answer.
STATUS_TIMEOUT = 10.0


def add_parser(sub) -> None:
    p = sub.add_parser("daemon", help="start the daemon (in the background unless --foreground)",
                       description="Start the malai daemon for every cluster in MALAI_HOME. Returns once it "
                                   "answers on its control socket, or prints why it could not start (exit 1).")
    p.add_argument("--foreground", action="store_true", help="stay attached and log to stdout")
    p.add_argument("--listen", action="append", default=[], metavar="ENDPOINT",
                   help="peer listen endpoint, e.g. tcp:7420 (repeatable; default [daemon] listen, else tcp:7420)")
    p.add_argument("--json-logs", action="store_true", help="log JSON lines instead of text")
    p.add_argument("--log-level", type=_log_level, metavar="LEVEL",
                   help="debug, info, warn, error or critical: the least a line must be to be logged "
                        "(default $MALAI_LOG, else info)")
    p.add_argument("--log-size", type=_at_least(10_000), default=DEFAULT_SIZE, metavar="BYTES",
                   help=f"rotate malai.log at this size (default {DEFAULT_SIZE})")
    p.add_argument("--log-files", type=_at_least(1), default=DEFAULT_FILES, metavar="N",
                   help=f"rotated logs to keep; older ones are deleted (default {DEFAULT_FILES})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon to answer")
    p.set_defaults(run=run_daemon)

    s = sub.add_parser("status", help="is the daemon running, and what it serves",
                       description="RUNNING (exit 0), STARTING (exit 4: it holds the lock and is still "
                                   "loading), NOT ANSWERING (exit 1: it holds the lock but its socket does not "
                                   "answer), CRASHED or STALE (exit 3: it is gone and left files, named with the "
                                   "command that clears them), NOT RUNNING (exit 3).")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(run=run_status)

    t = sub.add_parser("stop", help="stop the daemon",
                       description="Stop accepting, let in-flight work finish, remove the socket, release the lock.")
    t.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it to exit")
    t.set_defaults(run=run_stop)


def _log_level(text: str) -> str:
    from malai.logs import level_problem

    if level_problem(text.lower()):
        raise ValueError(text)
    return text.lower()


_log_level.__name__ = "log level (debug, info, warn, error, critical)"


def _at_least(least: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise ValueError(text)
        return value

    parse.__name__ = f"integer of at least {least}"
    return parse


def twistd_argv(home: Home, args) -> List[str]:
    """twistd in the foreground, logging through ``malai.logs`` (to ``$MALAI_LOG_FILE``)."""
    twistd = str(Path(sys.executable).with_name("twistd"))
    argv = [twistd, "--nodaemon", "--pidfile=", f"--logger=malai.logs.{'json' if args.json_logs else 'text'}_observer"]
    argv += ["malai", "--home", str(home.root)]
    if args.log_level:
        argv += ["--log-level", args.log_level]
    for listen in args.listen:
        argv += ["--listen", listen]
    return argv


def run_daemon(args) -> int:
    home = home_of(args)
    home.ensure()
    env = dict(os.environ, MALAI_HOME=str(home.root), MALAI_LOG_SIZE=str(args.log_size),
               MALAI_LOG_FILES=str(args.log_files))
    if args.foreground:
        env["MALAI_LOG_FILE"] = "-"
        argv = twistd_argv(home, args)
        os.execve(argv[0], argv, env)
    pid = DaemonLock(home.lock).holder()
    if pid:
        raise MalaiError(f"already running (pid {pid})")
    owner = socket_owner(home.socket)
    if owner:
        raise MalaiError(f"already running (pid {owner}), answering on {home.socket} though it holds no "
                         f"{home.lock.name} (was the file removed?): `malai stop`, then `malai daemon`")
    home.log_dir.mkdir(mode=0o700, exist_ok=True)
    logfile = home.log_dir / "malai.log"
    env["MALAI_LOG_FILE"] = str(logfile)
    output = home.log_dir / "daemon.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen(twistd_argv(home, args), env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = output.read_text(errors="replace").strip()
            raise MalaiError(_startup_error(text, logfile) or f"the daemon exited with status {proc.returncode}; see {logfile}")
        if _answers(home.socket) and DaemonLock(home.lock).holder() == proc.pid:
            print(f"malai daemon running (pid {proc.pid}); logs in {logfile}")
            return 0
        time.sleep(0.05)
    raise MalaiError(f"the daemon (pid {proc.pid}) did not answer within {args.timeout:g}s; see {logfile}")


def _startup_error(output: str, logfile: Path) -> Optional[str]:
    lines = [line for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("malai: "):
            return line[len("malai: "):]
    try:
        for line in logfile.read_text(errors="replace").splitlines():
            if "cannot start:" in line:
                return line.split("cannot start:", 1)[1].strip()
    except FileNotFoundError:
        pass
    return lines[-1] if lines else None


def _answers(path: Path) -> bool:
    return socket_owner(path) is not None


def socket_owner(path: Path) -> Optional[int]:
    """The pid of the process listening on the UNIX socket ``path``, if one accepts connections there."""
    import struct

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           struct.calcsize("3i")))
        return pid or -1
    except OSError:
        return None
    finally:
        s.close()


def process_age(pid: int) -> Optional[float]:
    """Seconds since ``pid`` started, from /proc (None when it is not running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


async def daemon_state(reactor, home: Home, summary: bool = True) -> dict:
    """The daemon's state, decided from the lock, the socket and the processes, never by guessing:

    - RUNNING: it answers (with its status), also when its lock file was removed by hand;
    - STARTING: a process holds the lock, started less than ``STARTUP_WINDOW`` ago and has no socket yet;
    - NOT ANSWERING: a process holds the lock (or runs without one) but its socket does not answer;
    - CRASHED: the lock is free and names a pid that is gone: that daemon died (``kill -9``, a crash);
    - STALE: the lock is free and a socket nobody answers on is left;
    - NOT RUNNING: none of that.

    ``summary``: of a manager's machines and links only the first ten (the counts say how many)."""
    lock = DaemonLock(home.lock)
    paths = {"home": str(home.root), "lock": str(home.lock), "socket": str(home.socket)}
    pid = lock.holder()
    if not pid:
        owner = socket_owner(home.socket)
        if owner:
            state = await _ask(reactor, home, owner, summary)
            if state["state"] == RUNNING:
                state["warning"] = (f"the daemon holds no {home.lock.name} (was the file removed?); a second "
                                    "daemon could start next to it: `malai stop`, then `malai daemon`")
            return {**paths, **state}
        return {**paths, **_not_running(home, lock)}
    if not home.socket.exists():
        age = process_age(pid)
        if age is not None and age < STARTUP_WINDOW:
            return {**paths, "state": STARTING, "pid": pid, "age": age,
                    "fix": f"the daemon (pid {pid}) started {age:.0f}s ago and is loading its clusters; it "
                           f"answers on {home.socket} once ready (`malai logs` shows its progress)"}
        if age is not None:
            return {**paths, "state": NOT_ANSWERING, "pid": pid,
                    "fix": f"the daemon (pid {pid}) holds {home.lock} but has had no socket at {home.socket} "
                           f"for {age:.0f}s; `malai logs` says why, `kill {pid}` stops it"}
    return {**paths, **await _ask(reactor, home, pid, summary)}


async def _ask(reactor, home: Home, pid: int, summary: bool) -> dict:
    from malai.control.client import call
    from malai.control.commands import Status

    try:
        status = await call(reactor, home.socket, Status, timeout=STATUS_TIMEOUT, summary=summary)
    except Exception as e:  # a MalaiError says why; anything else is an answer we could not read
        reason = e if isinstance(e, MalaiError) else f"an unreadable answer ({type(e).__name__})"
        return {"state": NOT_ANSWERING, "pid": pid,
                "fix": f"the daemon (pid {pid}) holds {home.lock} but did not answer: {reason}"}
    return {"state": RUNNING, **status}


def _not_running(home: Home, lock: DaemonLock) -> dict:
    """The lock is free and nobody answers on the socket: what is left, and by whom."""
    recorded = lock.recorded_pid()  # a daemon that stops clears it; one that dies cannot
    if recorded and _running(recorded) and _is_malai(recorded):
        return {"state": NOT_ANSWERING, "pid": recorded,
                "fix": f"the daemon (pid {recorded}) named in {home.lock} runs but holds no lock and does not "
                       f"answer on {home.socket} (were they removed by hand?); `kill {recorded}` stops it, then "
                       "`malai daemon`"}
    leftovers = ([f"{home.lock} naming pid {recorded}"] if recorded else []) + \
                ([str(home.socket)] if home.socket.exists() or home.socket.is_symlink() else [])
    if recorded:
        return {"state": CRASHED, "pid": recorded, "leftovers": leftovers,
                "fix": f"the daemon (pid {recorded}) is gone without stopping (killed or crashed; `malai logs` "
                       f"may say why) and left {' and '.join(leftovers)}; `malai daemon` clears them and starts "
                       "again"}
    if leftovers:
        return {"state": STALE, "leftovers": leftovers,
                "fix": f"no daemon runs, but {home.socket} is left and nobody answers on it; `malai daemon` "
                       "replaces it"}
    return {"state": NOT_RUNNING}


def _is_malai(pid: int) -> bool:
    """Whether ``pid`` runs malai (its pid may have gone to another program since a crash)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"malai" in f.read()
    except OSError:
        return False


def run_status(args) -> int:
    home = home_of(args)
    state = run_twisted(daemon_state, home, not args.json)
    for c in state.get("clusters", []):
        c["config"] = str(home.root / "clusters" / c["cluster"] /
                          ("cluster.toml" if c["role"] == "manager" else "machine.toml"))
    if args.json:
        print_json(state)
    else:
        _print_status(state)
    return EXIT_CODES.get(state["state"], EXIT_NOT_RUNNING)


def _print_status(state: dict) -> None:
    print(state["state"])
    for key in ("fix", "warning"):
        if key in state:
            print(f"  {state[key]}")
    print(f"  home {state['home']}, lock {state['lock']}, socket {state['socket']}")
    if state["state"] != RUNNING:
        return
    print(f"  pid {state['pid']}, malai {state['version']}, up {_duration(state['uptime'])}")
    print(f"  peers on {', '.join(state['listen']) or 'nothing'}")
    for c in state["clusters"]:
        waiting = " (waiting for its first config)" if c["waiting_for_config"] else ""
        if c.get("manager_problem"):
            waiting += f"\n    manager unreachable: {c['manager_problem']}"
        machines = f", {c['machines']} machines" if c["role"] == "manager" else ""
        print(f"  {c['cluster']:<16} {c['role']:<8} {c['id52']}{machines}, config version "
              f"{c['config_version']}, {c['links']} links{waiting}")
        print(f"    config {c['config']}")
        for link in c["peer_links"]:  # a summary: the first ten
            rtt = f", round trip {link['rtt'] * 1000:.1f} ms" if link.get("rtt") is not None else ""
            streams = f", {link['streams'] - 1} streams" if link.get("streams", 1) > 1 else ""
            print(f"    link to {link['peer']}: {link['path']}{rtt}{streams}")
        if c["links"] > len(c["peer_links"]):
            print(f"    … and {c['links'] - len(c['peer_links'])} more links (`malai status --json` lists them all)")
        _print_sync(c)
    for f in state.get("forwards", []):
        print(f"  tcp.{f['name']:<12} {f['local']} → {f['remote']}, {f['active']} open, {f['total']} since start")
    if state.get("tor", "off") != "off":
        print(f"  tor {state['tor']}: {', '.join(state['onions']) or 'no onion service up yet'}")
    if "lan_discovery" in state:
        seen = f", {state['lan_announced']} identities announced, {state['lan_seen']} heard" \
            if "lan_seen" in state else ""
        print(f"  LAN discovery {state['lan_discovery']}{seen}")
    if state.get("relay_total"):
        print(f"  relayed {state['relay_total']} links ({state['relay_active']} open), {state['relay_bytes']} bytes")
    if state.get("http"):
        print(f"  http front on {state['http']}: {', '.join(state['http_urls']) or 'no services to reach'}")


def _print_sync(cluster: dict) -> None:
    """A manager's machines: how many are in sync, pending, failing; every machine of a small
    cluster, else the ten furthest behind (failing first, then those unseen longest)."""
    if cluster["role"] != "manager" or not cluster["machines"]:
        return
    behind = cluster["pending"] + cluster["failing"]
    publishing = ", making the new configs" if cluster["publishing"] else ""
    print(f"    machines: {cluster['in_sync']} in sync, {cluster['pending']} pending, {cluster['failing']} failing"
          f"{publishing}")
    for m in cluster["sync"]:  # a summary: every machine of a small cluster, else the laggards
        seen = f"last seen {_duration(time.time() - m['last_seen'])} ago" if m["last_seen"] else "never seen"
        error = f": {m['error']}" if m["error"] and m["sync"] != "in sync" else ""
        print(f"    {m['machine']:<16} version {m['version']:<4} {m['sync']}{error}, {seen}")
    if cluster["machines"] > SUMMARY_LISTS and behind > SUMMARY_LISTS:
        print(f"    … and {behind - SUMMARY_LISTS} more not in sync (`malai status --json` lists every machine)")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_stop(args) -> int:
    from malai.control.client import call
    from malai.control.commands import Stop

    home = home_of(args)
    lock = DaemonLock(home.lock)
    pid = lock.holder() or socket_owner(home.socket)  # a daemon whose lock file was removed still stops
    if not pid:
        print("malai daemon is not running")
        return 0
    run_twisted(call, home.socket, Stop)
    deadline = time.monotonic() + args.timeout
    while lock.holder() or _running(pid):  # the lock goes first, then the process exits
        if time.monotonic() > deadline:
            raise MalaiError(f"the daemon (pid {pid}) did not stop within {args.timeout:g}s; run `kill {pid}`")
        time.sleep(0.05)
    print(f"malai daemon stopped (pid {pid})")
    return 0


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody reaped yet has stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
