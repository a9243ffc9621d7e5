"""``--json-logs``: a twistd ``--logger`` writing one JSON object per line."""

import os
import sys

from twisted.logger import jsonFileLogObserver
from twisted.python.logfile import LogFile

__all__ = ["json_observer"]


def json_observer():
    """JSON lines to ``$MALAI_LOG_FILE`` (rotated), or stdout when it is ``-``."""
    path = os.environ.get("MALAI_LOG_FILE", "-")
    if path == "-":
        return jsonFileLogObserver(sys.stdout)
    return jsonFileLogObserver(LogFile.fromFullPath(path, rotateLength=10_000_000, maxRotatedFiles=5))
