"""Read a TOML file into checked values, collecting every problem on the way."""

import re
import tomllib
from typing import Any, Callable, Dict, List, Optional, Tuple

from malai.config.errors import ConfigError, ConfigProblem
from malai.config.locate import KeyLocator

__all__ = ["Source", "Table", "check_addr", "check_name", "check_username"]

Check = Callable[[Any], Optional[str]]

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?\Z")
_TOML_POS = re.compile(r"\(at line (\d+), column \d+\)")


def check_name(value: str) -> Optional[str]:
    """A name usable as a DNS label: lowercase letters, digits and inner dashes."""
    if not _NAME.match(value):
        return f"{value!r} is not a valid name (lowercase letters, digits and '-', at most 63)"
    if len(value) == 52:
        return f"{value!r} is not a valid name: 52 characters would read as an ID52"
    return None


def check_username(value: str) -> Optional[str]:
    if not _USER.match(value):
        return f"{value!r} is not a valid user name"
    return None


def check_addr(value: str) -> Optional[str]:
    """``HOST:PORT`` or ``[IPV6]:PORT``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return f"{value!r} is not an address: use HOST:PORT with a port from 1 to 65535"
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return f"{value!r}: write an IPv6 address in brackets, as [::1]:7420"
    return None


class Source:
    """One config file being read: its name, key lines and problems so far."""

    def __init__(self, file: str, text: str):
        self.file = file
        self.text = text
        self.locator = KeyLocator(text)
        self.problems: List[ConfigProblem] = []

    def problem(self, path: Tuple[str, ...], message: str) -> None:
        self.problems.append(
            ConfigProblem(self.file, self.locator.line_of(path), ".".join(path), message)
        )

    def root(self) -> "Table":
        """Parse the text; a syntax error stops here, since nothing after it can be trusted."""
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            m = _TOML_POS.search(str(e))
            line = int(m.group(1)) if m else 1
            msg = _TOML_POS.sub("", str(e)).strip()
            raise ConfigError([ConfigProblem(self.file, line, "", f"TOML syntax error: {msg}")]) from None
        return Table(self, (), data)

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(sorted(self.problems, key=lambda p: (p.line, p.key, p.message)))


_MISSING = object()


class Table:
    """A TOML table at a key path; each accessor checks type and records problems."""

    def __init__(self, source: Source, path: Tuple[str, ...], data: Dict[str, Any]):
        self.source = source
        self.path = path
        self.data = data
        self.seen: set = set()

    def _value(self, key: str, kinds: Tuple[type, ...], what: str, required: bool) -> Any:
        self.seen.add(key)
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if required:
                self.source.problem(self.path + (key,), f"missing; {what} is required")
            return _MISSING
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            self.source.problem(self.path + (key,), f"must be {what}, not {_kind(value)}")
            return _MISSING
        return value

    def _checked(self, key: str, value: Any, check: Optional[Check]) -> Any:
        if check is not None:
            error = check(value)
            if error:
                self.source.problem(self.path + (key,), error)
                return _MISSING
        return value

    def string(self, key: str, required: bool = False, check: Optional[Check] = None, default: Any = None) -> Any:
        value = self._value(key, (str,), "a string", required)
        value = value if value is _MISSING else self._checked(key, value, check)
        return default if value is _MISSING else value

    def integer(self, key: str, required: bool = False, low: int = 0, high: int = 2**63, default: Any = None) -> Any:
        value = self._value(key, (int,), "an integer", required)
        if value is not _MISSING and not low <= value <= high:
            self.source.problem(self.path + (key,), f"must be from {low} to {high}, not {value}")
            value = _MISSING
        return default if value is _MISSING else value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._value(key, (bool,), "true or false", False)
        return default if value is _MISSING else value

    def strings(self, key: str, check: Optional[Check] = None, default: Any = ()) -> Any:
        value = self._value(key, (list,), "a list of strings", False)
        if value is _MISSING:
            return default
        out = []
        for item in value:
            if not isinstance(item, str):
                self.source.problem(self.path + (key,), f"must hold strings only, not {_kind(item)}")
            elif self._checked(key, item, check) is not _MISSING:
                out.append(item)
        return tuple(out)

    def table(self, key: str, required: bool = False) -> Optional["Table"]:
        value = self._value(key, (dict,), "a table", required)
        return None if value is _MISSING else Table(self.source, self.path + (key,), value)

    def tables(self, key: str, check_key: Optional[Check] = check_name) -> Dict[str, "Table"]:
        """The sub-tables of ``[key.NAME]``, by name."""
        parent = self.table(key)
        if parent is None:
            return {}
        out = {}
        for name, value in parent.data.items():
            parent.seen.add(name)
            path = parent.path + (name,)
            error = check_key(name) if check_key else None
            if error:
                self.source.problem(path, error)
            elif not isinstance(value, dict):
                self.source.problem(path, f"must be a table [{'.'.join(path)}], not {_kind(value)}")
            else:
                out[name] = Table(self.source, path, value)
        return out

    def done(self) -> None:
        """Report every key nobody asked for."""
        for key in self.data:
            if key not in self.seen:
                self.source.problem(self.path + (key,), "unknown key")


def _kind(value: Any) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "a list", dict: "a table",
    }.get(type(value), type(value).__name__)
