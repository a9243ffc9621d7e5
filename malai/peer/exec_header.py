"""The ``malai-exec`` header of an exec stream: what to run, as JSON, checked field by field.

An exec stream opens with kind ``exec`` and this one header (the request must be
authorised before the stream is accepted, so it travels with the HEADERS frame,
not in the stream). ``encode`` and ``decode`` are inverses; ``decode`` refuses,
with ``ValueError``, anything a malai client would not send.
"""

import json
from typing import Dict, Optional, Sequence

__all__ = ["HEADER", "MAX_EXEC_HEADER", "decode", "encode"]

HEADER = "malai-exec"
#: What one exec request may hold, JSON-encoded (within the link's header limit).
MAX_EXEC_HEADER = 48 * 1024

_TYPES = {"argv": list, "tty": bool, "term": str, "rows": int, "cols": int}
_OPTIONAL = {"timeout": (int, float), "line": str, "subsystem": str}


def encode(argv: Sequence[str], tty: bool, term: str, rows: int, cols: int, timeout: Optional[float] = None,
           line: Optional[str] = None, subsystem: Optional[str] = None) -> Dict[str, str]:
    """The stream headers of an exec request; ``ValueError`` if it is too large to send."""
    fields = {"argv": list(argv), "tty": tty, "term": term, "rows": rows, "cols": cols}
    fields.update({k: v for k, v in (("timeout", timeout), ("line", line), ("subsystem", subsystem))
                   if v is not None})
    text = json.dumps(fields, separators=(",", ":"))
    if len(text) > MAX_EXEC_HEADER:
        raise ValueError(f"the command is {len(text)} bytes long; malai sends at most {MAX_EXEC_HEADER}")
    return {HEADER: text}


def decode(headers: Dict[str, str]) -> dict:
    """The request's fields, as ``prepare`` takes them; ``ValueError`` says what is wrong."""
    text = headers.get(HEADER)
    if text is None or len(text) > MAX_EXEC_HEADER:
        raise ValueError(f"an exec stream needs a {HEADER} header of at most {MAX_EXEC_HEADER} bytes")
    try:
        fields = json.loads(text)
    except ValueError:
        raise ValueError(f"the {HEADER} header is not JSON") from None
    if not isinstance(fields, dict) or set(fields) - set(_TYPES) - set(_OPTIONAL):
        raise ValueError(f"the {HEADER} header has unknown fields")
    for name, kind in _TYPES.items():
        if type(fields.get(name)) is not kind:  # bool is no int here, nor int a bool
            raise ValueError(f"the {HEADER} header needs {name} as {kind.__name__}")
    for name, kinds in _OPTIONAL.items():
        value = fields.get(name)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise ValueError(f"the {HEADER} header has an invalid {name}")
    if not all(isinstance(word, str) for word in fields["argv"]):
        raise ValueError(f"the {HEADER} header's argv holds a non-string")
    if fields.get("timeout") is not None:
        fields["timeout"] = float(fields["timeout"])
    return {"timeout": None, "line": None, "subsystem": None, **fields}
