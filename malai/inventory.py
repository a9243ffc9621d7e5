"""What a machine runs on, read from the kernel (``/proc``, ``statvfs``): the inventory in a heartbeat."""

import os
import platform
import socket
from pathlib import Path
from typing import Dict, Optional

import malai

__all__ = ["inventory"]


def inventory(disk: Path) -> Dict[str, object]:
    """The malai version, OS, kernel, hostname, CPUs and load, memory and the disk holding
    ``disk`` (bytes, total and used), uptime, and this process's RSS and open descriptors."""
    memory_total, memory_available = _meminfo()
    fs = os.statvfs(disk)
    return {
        "version": malai.__version__,
        "os": _os_name(),
        "kernel": platform.release(),
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count() or 1,
        "load": list(os.getloadavg()),
        "memory_total": memory_total,
        "memory_used": memory_total - memory_available,
        "disk_total": fs.f_blocks * fs.f_frsize,
        "disk_used": (fs.f_blocks - fs.f_bfree) * fs.f_frsize,
        "uptime": _uptime(),
        "rss": _rss(),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def _meminfo() -> tuple:
    """(MemTotal, MemAvailable) in bytes."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _os_name() -> str:
    """``PRETTY_NAME`` of os-release, else the system's name."""
    pretty: Optional[str] = None
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("PRETTY_NAME="):
                        pretty = line.split("=", 1)[1].strip().strip('"')
            break
        except FileNotFoundError:
            continue
    return pretty or platform.system()
