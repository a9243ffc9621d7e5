"""Find the line each key of a TOML document is defined on.

``tomllib`` gives values without positions; this scanner reads the text once
and maps every table header and key path to its line, so problems can be
reported as ``file:line``. It understands headers, dotted and quoted keys,
multi-line strings and values that span lines; anything it cannot read is
simply not located (the caller falls back to the nearest enclosing table).
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["KeyLocator"]

KeyPath = Tuple[str, ...]
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _read_key(text: str, i: int) -> Tuple[Optional[KeyPath], int]:
    """Read a (dotted) key starting at ``text[i]``; return it and the index after it."""
    parts: List[str] = []
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i >= len(text):
            return None, i
        c = text[i]
        if c in "\"'":
            end = i + 1
            while end < len(text) and text[end] != c:
                end += 2 if (c == '"' and text[end] == "\\") else 1
            if end >= len(text):
                return None, end
            parts.append(text[i + 1 : end])
            i = end + 1
        else:
            m = _BARE.match(text, i)
            if not m:
                return None, i
            parts.append(m.group())
            i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        return tuple(parts), i


class KeyLocator:
    """Line numbers (1-based) of the keys and tables of one TOML text."""

    def __init__(self, text: str):
        self.lines: Dict[KeyPath, int] = {}
        self._scan(text)

    def line_of(self, path: Sequence[str]) -> int:
        """The line defining ``path``, else that of its nearest located parent, else 1."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return 1

    def _scan(self, text: str) -> None:
        table: KeyPath = ()
        depth = 0  # open [ and { inside a value
        in_string: Optional[str] = None  # the delimiter of an open multi-line string
        for lineno, line in enumerate(text.splitlines(), 1):
            i = 0
            if in_string is None and depth == 0:
                stripped = line.lstrip()
                i = len(line) - len(stripped)
                if stripped.startswith("["):
                    double = stripped.startswith("[[")
                    key, end = _read_key(line, i + (2 if double else 1))
                    if key is not None:
                        table = key
                        self.lines.setdefault(key, lineno)
                    continue
                key, end = _read_key(line, i)
                if key is None or end >= len(line) or line[end] != "=":
                    continue
                self.lines.setdefault(table + key, lineno)
                i = end + 1
            depth, in_string = self._scan_value(line, i, depth, in_string)

    @staticmethod
    def _scan_value(line: str, i: int, depth: int, in_string: Optional[str]) -> Tuple[int, Optional[str]]:
        """Track brackets and multi-line strings through the rest of one line."""
        while i < len(line):
            if in_string is not None:
                end = line.find(in_string, i)
                if end < 0:
                    return depth, in_string
                i, in_string = end + 3, None
                continue
            c = line[i]
            if c == "#":
                break
            if line.startswith('"""', i) or line.startswith("'''", i):
                in_string = line[i : i + 3]
                i += 3
            elif c in "\"'":
                end = i + 1
                while end < len(line) and line[end] != c:
                    end += 2 if (c == '"' and line[end] == "\\") else 1
                i = end + 1
            else:
                if c in "[{":
                    depth += 1
                elif c in "]}":
                    depth = max(0, depth - 1)
                i += 1
        return depth, in_string
