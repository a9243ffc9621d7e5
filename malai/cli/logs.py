"""``malai logs [-f] [--level LEVEL] [-n N]``: the daemon's log, ``$MALAI_HOME/log/malai.log``."""

import json
import os
import re
import sys
import time
from typing import Iterable, Iterator, Optional

from malai.cli.common import home_of
from malai.errors import MalaiError
from malai.logs import LEVELS

__all__ = ["add_parser", "level_of", "selected"]

_LEVEL = re.compile(r"^\S+ \[[^\]]*#(debug|info|warn|error|critical)\] ")
FOLLOW_EVERY = 0.2  # seconds between looks at a followed log


def add_parser(sub) -> None:
    p = sub.add_parser("logs", help="show the daemon's log",
                       description="The end of $MALAI_HOME/log/malai.log, where a daemon started with `malai "
                                   "daemon` logs (with --foreground or under systemd it logs to stdout instead: "
                                   "see journalctl). What is logged at all is set by `malai daemon --log-level`.")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing lines as they are logged (Ctrl-C ends)")
    p.add_argument("--level", type=str.lower, choices=LEVELS, default="debug",
                   help="show lines of this level and above (default: all that were logged)")
    p.add_argument("-n", "--lines", type=int, default=100, metavar="N",
                   help="how many of the last lines to show first (default 100; 0: the whole file)")
    p.set_defaults(run=run)


def level_of(line: str) -> Optional[str]:
    """The level of a line that starts an event (text or JSON), else None (a continuation)."""
    if line.startswith("\x1e"):
        try:
            return json.loads(line.strip("\x1e\n")).get("log_level", {}).get("name", "info")
        except (ValueError, AttributeError):
            return "info"
    if line.startswith("\t"):
        return None
    m = _LEVEL.match(line)
    return m.group(1) if m else "info"


def selected(lines: Iterable[str], least: str) -> Iterator[str]:
    """The lines of events at ``least`` or above; an event's continuation lines go with it."""
    floor, keep = LEVELS.index(least), True
    for line in lines:
        level = level_of(line)
        if level is not None:
            keep = LEVELS.index(level) >= floor
        if keep:
            yield _readable(line)


def _readable(line: str) -> str:
    """A JSON log line as text (what the text log would say); a text line as it is."""
    if not line.startswith("\x1e"):
        return line
    from twisted.logger import eventFromJSON, formatEventAsClassicLogText

    try:
        return formatEventAsClassicLogText(eventFromJSON(line.strip("\x1e\n"))) or ""
    except ValueError:
        return line


def run(args) -> int:
    path = home_of(args).log_dir / "malai.log"
    try:
        f = open(path, errors="replace")
    except FileNotFoundError:
        raise MalaiError(f"no log at {path}: a daemon started with --foreground or by systemd logs to stdout "
                         "(`journalctl -u malai`); `malai daemon` logs there") from None
    with f:
        lines = f.readlines()
        start = len(lines) - args.lines if args.lines > 0 else 0
        while 0 < start < len(lines) and level_of(lines[start]) is None:
            start -= 1  # begin with the head of an event
        sys.stdout.writelines(selected(lines[max(0, start):], args.level))
        sys.stdout.flush()
        if not args.follow:
            return 0
        try:
            _follow(f, path, args.level)
        except KeyboardInterrupt:
            pass
    return 0


def _follow(f, path, least: str) -> None:
    """Print what is appended, reopening the file when it is rotated."""
    inode = os.fstat(f.fileno()).st_ino
    while True:
        chunk = f.readlines()
        if chunk:
            sys.stdout.writelines(selected(chunk, least))
            sys.stdout.flush()
            continue
        time.sleep(FOLLOW_EVERY)
        try:
            if os.stat(path).st_ino != inode:  # rotated: read the rest, then the new file
                sys.stdout.writelines(selected(f.readlines(), least))
                f.close()
                f = open(path, errors="replace")
                inode = os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            continue
