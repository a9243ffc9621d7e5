"""Errors a person can act on: what went wrong, where, and what to do."""

__all__ = ["MalaiError", "UsageError"]


class MalaiError(Exception):
    """A failure the CLI reports as one line and exit status 1."""

    exit_code = 1


class UsageError(MalaiError):
    """Bad arguments: reported with exit status 2."""

    exit_code = 2
