"""The daemon's log observers for twistd's ``--logger``: text or JSON lines, to
``$MALAI_LOG_FILE`` rotated at ``$MALAI_LOG_SIZE`` bytes keeping ``$MALAI_LOG_FILES``
old files, or to stdout when the file is ``-``."""

import os
import sys

__all__ = ["DEFAULT_FILES", "DEFAULT_SIZE", "json_observer", "text_observer"]

DEFAULT_SIZE = 10_000_000
DEFAULT_FILES = 5


def _output():
    from twisted.python.logfile import LogFile

    path = os.environ.get("MALAI_LOG_FILE", "-")
    if path == "-":
        return sys.stdout
    return LogFile.fromFullPath(path, rotateLength=int(os.environ.get("MALAI_LOG_SIZE", DEFAULT_SIZE)),
                                maxRotatedFiles=int(os.environ.get("MALAI_LOG_FILES", DEFAULT_FILES)))


def text_observer():
    from twisted.logger import textFileLogObserver

    return textFileLogObserver(_output())


def json_observer():
    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(_output())
