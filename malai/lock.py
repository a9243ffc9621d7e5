"""The daemon lock: ``$MALAI_HOME/malai.lock``, held with ``flock`` for the daemon's life.

The kernel drops an ``flock`` when its holder dies, even by ``kill -9``, so
there is no stale lock to take over and no PID-reuse trap; the file's content
(the holder's pid) is only for messages. DESIGN.md names FilesystemLock;
docs/architecture.md says why this differs.
"""

import fcntl
import os
import time
from pathlib import Path
from typing import Optional

from malai.errors import MalaiError

__all__ = ["AlreadyRunning", "DaemonLock"]


class AlreadyRunning(MalaiError):
    def __init__(self, pid: Optional[int]):
        self.pid = pid
        super().__init__(f"already running (pid {pid if pid else 'unknown'})")


class DaemonLock:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock and write our pid, or raise AlreadyRunning."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        for _ in range(10):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A `malai status` probing the lock holds it shared for an instant.
                time.sleep(0.02)
        else:
            os.close(fd)
            raise AlreadyRunning(self._wait_for_pid())
        self._fd = fd
        self.write_pid()

    def write_pid(self) -> None:
        """Record the current pid (again after a fork: the lock survives it)."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> Optional[int]:
        """The pid of the live daemon holding the lock, or None when nobody holds it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._wait_for_pid() or -1
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def recorded_pid(self) -> Optional[int]:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isascii() and text.isdigit() else None

    def _wait_for_pid(self) -> Optional[int]:
        # The holder writes its pid right after locking; give it a moment.
        for _ in range(20):
            pid = self.recorded_pid()
            if pid:
                return pid
            time.sleep(0.05)
        return None
