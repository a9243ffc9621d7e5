"""``MemoryTrim``: hand memory back to the system after a burst of load.

After 1,000 concurrent exec sessions a daemon's RSS stayed at 98-129 MB from
57 MB. Two causes, measured (``docs/memory.md``): each finished session
leaves a reference cycle (TLS transport, protocol, session, pyOpenSSL's
per-connection verify helper) that holds its OpenSSL connection until
Python's cyclic collector runs a full pass, which its thresholds (counted in
objects, blind to OpenSSL's buffers) put off; and glibc keeps the freed heap
chunks for reuse, giving back only the top of the heap. So while RSS is more
than ``slack`` above the lowest seen, this service runs a full collection and
``malloc_trim(0)`` every ``interval`` seconds; when that gives nothing back
(the memory is in use) it waits up to ``max_skip`` intervals before the next
try. On a C library without ``malloc_trim`` only the collection runs.
"""

import ctypes
import ctypes.util
import gc
import os
from typing import Callable, Optional

from twisted.application.internet import TimerService
from twisted.logger import Logger

__all__ = ["MemoryTrim", "rss_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _malloc_trim() -> Optional[Callable[[int], int]]:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


class MemoryTrim(TimerService):
    log = Logger()

    def __init__(self, clock=None, interval: float = 10.0, slack: float = 0.10, max_skip: int = 3,
                 rss: Callable[[], int] = rss_bytes, trim: Optional[Callable[[int], int]] = None,
                 collect: Callable[[], int] = gc.collect):
        super().__init__(interval, self.check)
        if clock is not None:
            self.clock = clock
        self.slack = slack
        self.max_skip = max_skip
        self.rss = rss
        self.trim = trim if trim is not None else _malloc_trim()
        self.collect = collect
        self.floor: Optional[int] = None
        self._wait = self._skip = 0

    def check(self) -> None:
        now = self.rss()
        if self.floor is None or now < self.floor:
            self.floor = now
        if now <= self.floor * (1 + self.slack):
            self._wait = self._skip = 0
            return
        if self._skip:
            self._skip -= 1
            return
        self.collect()
        if self.trim is not None:
            self.trim(0)
        after = self.rss()
        if now - after < self.floor * self.slack / 2:  # in use: try less often
            self._wait = min(self._wait * 2 or 1, self.max_skip)
            self._skip = self._wait
        else:
            self._wait = 0
            self.log.info("gave {freed} MB back to the system after load ({rss} MB resident now)",
                          freed=round((now - after) / 2**20, 1), rss=round(after / 2**20, 1))
