"""Helpers shared by the CLI commands."""

import json
import sys
from pathlib import Path
from typing import Any, Callable, Coroutine

from malai.errors import MalaiError
from malai.home import Home

__all__ = ["home_of", "print_json", "run_twisted"]


def home_of(args) -> Home:
    return Home(Path(args.home)) if args.home else Home.default()


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def run_twisted(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(reactor, *args, **kwargs)`` to completion and return its result.

    ``fn`` may return a Deferred or be a coroutine function. The reactor runs
    once per process, so a command does all its Twisted work in one ``fn``.
    Failures the daemon reports (``ControlFailed``) come back as MalaiError.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred, maybeDeferred
    from twisted.internet.error import ConnectError
    from twisted.python.failure import Failure

    from malai.control.commands import ControlFailed

    outcome: dict = {}

    def record(result: Any) -> None:
        outcome["result"] = result
        reactor.stop()

    def start() -> None:
        d = maybeDeferred(fn, reactor, *args, **kwargs)
        d.addCallback(lambda r: ensureDeferred(r) if isinstance(r, Coroutine) else r)
        d.addBoth(record)

    reactor.callWhenRunning(start)
    reactor.run()
    result = outcome.get("result")
    if isinstance(result, Failure):
        if result.check(MalaiError, KeyboardInterrupt):
            result.raiseException()
        if result.check(ControlFailed):
            raise MalaiError(str(result.value))
        if result.check(ConnectError):
            raise MalaiError(f"cannot reach the daemon: {result.getErrorMessage()}")
        raise MalaiError(f"{type(result.value).__name__}: {result.getErrorMessage()}")
    return result


def log_to_stderr(prefix: str, verbose: bool) -> None:
    """malai's own events on stderr, each line ``prefix: …``: warnings, or with ``verbose`` every
    link and connection; a line said twice in a row (a refusal logged by two layers) once."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        PredicateResult,
        formatEvent,
        globalLogBeginner,
    )

    last = [""]

    def emit(event) -> None:
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += f": {event['log_failure'].getErrorMessage()}"
        if text != last[0]:
            print(f"{prefix}: {text}", file=sys.stderr, flush=True)
        last[0] = text

    def ours(event) -> PredicateResult:
        return PredicateResult.maybe if event.get("log_namespace", "").startswith("malai") else PredicateResult.no

    level = LogLevelFilterPredicate(LogLevel.info if verbose else LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(emit, [ours, level])], redirectStandardIO=False)
