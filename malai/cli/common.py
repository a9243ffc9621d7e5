"""Helpers shared by the CLI commands."""

import json
import sys
from typing import Any

from malai.home import Home

__all__ = ["home_of", "print_json"]


def home_of(args) -> Home:
    from pathlib import Path

    return Home(Path(args.home)) if args.home else Home.default()


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")
