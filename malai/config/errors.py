"""Config problems reported as ``file:line: key.path: message``, all at once."""

from typing import Iterable, Optional

import attrs

from malai.errors import MalaiError

__all__ = ["ConfigError", "ConfigProblem"]


@attrs.frozen
class ConfigProblem:
    """One thing wrong with one config file."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        key = f" {self.key}:" if self.key else ""
        return f"{self.file}:{self.line}:{key} {self.message}"


class ConfigError(MalaiError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: Iterable[ConfigProblem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, file: str, message: str, line: int = 1, key: Optional[str] = None) -> "ConfigError":
        return cls([ConfigProblem(file, line, key or "", message)])
