"""``log/audit.jsonl``: what peers asked of this machine, allowed or denied."""

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["AuditLog"]


class AuditLog:
    """``log/audit.jsonl``: one line per request, allowed or denied."""

    def __init__(self, path: Path, observer: Optional[Callable[[dict], None]] = None):
        """``observer`` sees each record's fields after it is written (the metrics count them)."""
        self.path = path
        self.observer = observer

    def record(self, **fields) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        if self.observer is not None:
            self.observer(fields)
