"""ssh's command string on the machine: plain words run as an argv, the rest needs a shell.

``malai ssh`` sends the words after the host joined into one string, as ssh does. Where the
string is only words, quotes and backslashes, ``split_command`` gives exactly the argv a POSIX
shell would (bash and dash agree on this subset), and that argv is authorised and run like any
other, with no shell. Anything the shell would give a meaning to (``| & ; < > ( ) $ `` `` ` ``,
globs, ``{ } !``, a comment, an assignment or a newline, a shell keyword or builtin as the
command) raises ``NeedsShell``: such a string runs through the user's shell, and only for
callers who may run one. The one expansion done here is ssh's everyday ``~/path`` argument, the
run-as user's home, which bash and dash expand the same way.
"""

import re
from typing import FrozenSet, List

import attrs

__all__ = ["NeedsShell", "Split", "split_command"]

_BLANK = " \t"
_OPERATORS = "|&;<>()"
_GLOB = "*?["
_OTHERS = "{}!"  # brace expansion, reserved words, history and extglob in bash
_DOUBLE_QUOTE_ESCAPES = '$`"\\\n'
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: First words that mean something else to a shell than to exec: keywords and builtins
#: that exist as programs, if at all, only to do nothing useful outside a shell.
SHELL_WORDS = frozenset("""
    ! { } [[ ]] case coproc do done elif else esac fi for function if select then time until while
    . : alias bg bind break builtin caller cd command compgen complete continue declare dirs disown
    enable eval exec exit export fc fg getopts hash help history jobs let local logout mapfile popd
    pushd read readarray readonly return set shift shopt source suspend times trap type typeset
    ulimit umask unalias unset wait
""".split())


class NeedsShell(ValueError):
    """The string means more than words to a shell; the message says what (for the caller)."""


@attrs.frozen
class Split:
    """The words of a command string; ``tildes``: the words whose leading ``~`` is the home."""

    words: List[str]
    tildes: FrozenSet[int] = frozenset()

    def expanded(self, home: str) -> List[str]:
        return [home + w[1:] if i in self.tildes else w for i, w in enumerate(self.words)]


def split_command(line: str) -> Split:
    """The argv a POSIX shell makes of ``line``, or ``NeedsShell`` when the shell would do more."""
    words: List[str] = []
    tildes = set()
    word: List[str] = []
    started = quoted = False  # a word is in progress; some of it was quoted
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in _BLANK:
            if started:
                words.append("".join(word))
                word, started, quoted = [], False, False
            i += 1
            continue
        if c == "\\":
            if i + 1 == n:
                raise NeedsShell("a backslash at the end")
            if line[i + 1] == "\n":  # a line continuation: removed
                i += 2
                continue
            word.append(line[i + 1])
            started = quoted = True
            i += 2
        elif c == "'":
            end = line.find("'", i + 1)
            if end < 0:
                raise NeedsShell("an unterminated ' quote")
            word.append(line[i + 1:end])
            started = quoted = True
            i = end + 1
        elif c == '"':
            i = _double_quoted(line, i + 1, word)
            started = quoted = True
        elif c == "\n":
            raise NeedsShell("a newline")
        elif c in _OPERATORS or c in "$`" or c in _GLOB or c in _OTHERS:
            raise NeedsShell(f"an unquoted {c!r}")
        elif c == "#" and not started:
            raise NeedsShell("a comment")
        elif c == "~":
            if not started:
                end = i + 1
                if end < n and line[end] not in _BLANK and line[end] != "/":
                    raise NeedsShell("a ~user path")
                if not words:
                    raise NeedsShell("a ~ path as the command")
                tildes.add(len(words))
            elif "".join(word)[-1:] in ("=", ":"):
                raise NeedsShell("a ~ after = or :")
            word.append(c)
            started = True
            i += 1
        else:
            if c == "=" and not words and not quoted and _NAME.match("".join(word)):
                raise NeedsShell("a variable assignment")
            word.append(c)
            started = True
            i += 1
    if started:
        words.append("".join(word))
    if words and words[0] in SHELL_WORDS:
        raise NeedsShell(f"{words[0]!r}, a shell keyword or builtin")
    return Split(words, frozenset(tildes))


def _double_quoted(line: str, i: int, word: List[str]) -> int:
    """Append the inside of a double-quoted part starting at ``i``; the index after its close."""
    n = len(line)
    while i < n:
        c = line[i]
        if c == '"':
            return i + 1
        if c in "$`":
            raise NeedsShell(f"a {c!r} inside double quotes")
        if c == "\\" and i + 1 < n and line[i + 1] in _DOUBLE_QUOTE_ESCAPES:
            if line[i + 1] != "\n":
                word.append(line[i + 1])
            i += 2
            continue
        word.append(c)
        i += 1
    raise NeedsShell('an unterminated " quote')
