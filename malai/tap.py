"""``twistd malai``: options and the service maker."""

import os
from pathlib import Path

from twisted.python import usage

from malai.config.models import DeviceConfig
from malai.errors import MalaiError

__all__ = ["Options", "makeService"]

DEFAULT_LISTEN = "tcp:7420"


class Options(usage.Options):
    synopsis = "[--home DIR] [--listen ENDPOINT]... [--control ENDPOINT] [--log-level LEVEL]"
    longdesc = "Run the malai daemon for every cluster in MALAI_HOME."
    optParameters = [
        ["home", None, None, "MALAI_HOME (default: $MALAI_HOME or ~/.local/share/malai)"],
        ["control", None, None, "control socket endpoint (default: unix:$MALAI_HOME/malai.socket)"],
        ["log-level", None, None, "debug, info, warn, error or critical: the least a line must be to be logged by "
                                  "--logger=malai.logs.text_observer (or json_observer) (default: $MALAI_LOG, "
                                  "else info)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen for peer links on this endpoint (repeatable; default: [daemon] listen, else tcp:7420)."""
        self["listen"].append(description)


def control_endpoint(socket_path: Path) -> str:
    escaped = str(socket_path).replace(":", "\\:")
    return f"unix:{escaped}:mode=600:lockfile=0"


def makeService(options: Options):
    """Take the lock, check the home, then build the service tree."""
    from twisted.internet import reactor

    from malai.home import Home
    from malai.lock import DaemonLock
    from malai.logs import level_problem, set_level
    from malai.services.root import MalaiService

    home = Home(Path(options["home"])) if options["home"] else Home.default()
    os.umask(0o077)
    raise_fd_limit()
    try:
        _set_log_level(options["log-level"], level_problem, set_level)
        home.ensure()
        lock = DaemonLock(home.lock)
        lock.acquire()
        device = _device(home)
        listen = options["listen"] or list(device.listen) or [DEFAULT_LISTEN]
        if options["control"]:
            control = options["control"]
        else:
            try:
                _remove_stale_socket(home.socket)
            except MalaiError:
                lock.release()  # we never ran: leave no pid behind that reads as a crash
                raise
            control = control_endpoint(home.socket)
    except MalaiError as e:
        raise SystemExit(f"malai: {e}") from None
    return MalaiService(reactor, home, lock, listen, control, links=device.links)


def raise_fd_limit() -> None:
    """Every forwarded connection holds two descriptors: allow as many as the hard limit does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def _device(home) -> DeviceConfig:
    try:
        return home.load_device()
    except MalaiError:
        return DeviceConfig()  # reported by the first rescan; the daemon still starts


def _set_log_level(option, level_problem, set_level) -> None:
    """``--log-level``, else ``$MALAI_LOG``; a word that is no level stops the start."""
    name, where = (option, "--log-level") if option else (os.environ.get("MALAI_LOG"), "MALAI_LOG")
    if not name:
        return
    problem = level_problem(name.strip().lower())
    if problem:
        raise MalaiError(f"{where}: {problem}")
    set_level(name.strip().lower())


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon. Holding the lock is not proof enough: its file
    may have been removed under a live daemon, so a socket that still answers is left alone."""
    import socket
    import stat

    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                os.unlink(path)  # nobody listens: a dead daemon's
            except OSError as e:  # a full accept queue, say: someone listens
                raise MalaiError(f"cannot tell whether a daemon still serves {path} ({e.strerror or e}); "
                                 "leaving it in place: check with `malai status`") from None
            else:
                raise MalaiError(f"another daemon answers on {path} though the lock was free (was malai.lock "
                                 "removed?); stop it with `malai stop`, then start again")
            finally:
                probe.close()
    except FileNotFoundError:
        pass
    if len(str(path).encode()) > 107:
        raise MalaiError(f"{path} is longer than a UNIX socket path may be (107 bytes): "
                         "use a shorter MALAI_HOME or --control unix:/short/path")
