"""The daemon's log observers for twistd's ``--logger``: text or JSON lines, to
``$MALAI_LOG_FILE`` rotated at ``$MALAI_LOG_SIZE`` bytes keeping ``$MALAI_LOG_FILES``
old files, or to stdout when the file is ``-``; events below the log level (``--log-level``
of ``twistd malai``, else ``$MALAI_LOG``, else ``info``) are left out."""

import os
import sys
from typing import Optional

__all__ = ["DEFAULT_FILES", "DEFAULT_LEVEL", "DEFAULT_SIZE", "LEVELS", "json_observer", "level", "level_problem",
           "set_level", "text_observer"]

DEFAULT_SIZE = 10_000_000
DEFAULT_FILES = 5
LEVELS = ("debug", "info", "warn", "error", "critical")  # twisted.logger's LogLevel names, lowest first
DEFAULT_LEVEL = "info"

_level: Optional[str] = None  # set by ``twistd malai --log-level``


def level_problem(name: str) -> Optional[str]:
    return None if name in LEVELS else f"{name!r} is not a log level: {', '.join(LEVELS)}"


def set_level(name: str) -> None:
    global _level
    _level = name


def level() -> str:
    """The level in force: ``--log-level``, else ``$MALAI_LOG`` (when it names a level), else info."""
    if _level is not None:
        return _level
    env = os.environ.get("MALAI_LOG", "").strip().lower()
    return env if env in LEVELS else DEFAULT_LEVEL


def _output():
    from twisted.python.logfile import LogFile

    path = os.environ.get("MALAI_LOG_FILE", "-")
    if path == "-":
        return sys.stdout
    return LogFile.fromFullPath(path, rotateLength=int(os.environ.get("MALAI_LOG_SIZE", DEFAULT_SIZE)),
                                maxRotatedFiles=int(os.environ.get("MALAI_LOG_FILES", DEFAULT_FILES)))


def _filtered(observer):
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate

    return FilteringLogObserver(observer, [LogLevelFilterPredicate(LogLevel.levelWithName(level()))])


def text_observer():
    from twisted.logger import textFileLogObserver

    return _filtered(textFileLogObserver(_output()))


def json_observer():
    from twisted.logger import jsonFileLogObserver

    return _filtered(jsonFileLogObserver(_output()))
