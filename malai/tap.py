"""``twistd malai``: options and the service maker."""

import os
from pathlib import Path

from twisted.python import usage

from malai.errors import MalaiError

__all__ = ["Options", "makeService"]

DEFAULT_LISTEN = "tcp:7420"


class Options(usage.Options):
    synopsis = "[--home DIR] [--listen ENDPOINT]... [--control ENDPOINT]"
    longdesc = "Run the malai daemon for every cluster in MALAI_HOME."
    optParameters = [
        ["home", None, None, "MALAI_HOME (default: $MALAI_HOME or ~/.local/share/malai)"],
        ["control", None, None, "control socket endpoint (default: unix:$MALAI_HOME/malai.socket)"],
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
    from malai.services.root import MalaiService

    home = Home(Path(options["home"])) if options["home"] else Home.default()
    os.umask(0o077)
    raise_fd_limit()
    try:
        home.ensure()
        lock = DaemonLock(home.lock)
        lock.acquire()
        listen = options["listen"] or list(_device_listen(home)) or [DEFAULT_LISTEN]
        if options["control"]:
            control = options["control"]
        else:
            _remove_stale_socket(home.socket)
            control = control_endpoint(home.socket)
    except MalaiError as e:
        raise SystemExit(f"malai: {e}") from None
    return MalaiService(reactor, home, lock, listen, control)


def raise_fd_limit() -> None:
    """Every forwarded connection holds two descriptors: allow as many as the hard limit does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def _device_listen(home) -> tuple:
    try:
        return home.load_device().listen
    except MalaiError:
        return ()  # reported by the first rescan; the daemon still starts


def _remove_stale_socket(path: Path) -> None:
    """We hold the lock, so no live daemon owns a socket file left here."""
    import stat

    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    if len(str(path).encode()) > 107:
        raise MalaiError(f"{path} is longer than a UNIX socket path may be (107 bytes): "
                         "use a shorter MALAI_HOME or --control unix:/short/path")
