"""Where MALAI_HOME is, without importing anything heavy (the exec path uses this)."""

import os
import sys
from pathlib import Path

__all__ = ["default_home"]


def default_home() -> Path:
    """``$MALAI_HOME``, else the platform data dir (``$XDG_DATA_HOME/malai``, ``~/.local/share/malai``)."""
    env = os.environ.get("MALAI_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "malai"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "malai"
