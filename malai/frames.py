"""The framing of an exec stream, shared by the daemon and the stdlib CLI client.

After an exec request is accepted, the connection carries frames: one type
byte, a 4-byte big-endian length, then the payload. Stdlib only: the ``malai``
command's exec path must not import Twisted.
"""

import json
import struct
from typing import Iterator, Tuple

__all__ = [
    "EOF", "ERROR", "EXIT", "FrameParser", "SIGNAL", "STDERR", "STDIN", "STDOUT", "WINSIZE",
    "encode", "exit_frame", "winsize_frame",
]

STDIN, EOF, STDOUT, STDERR, SIGNAL, WINSIZE, EXIT, ERROR = b"i", b"I", b"o", b"e", b"s", b"w", b"x", b"E"
_HEADER = struct.Struct(">cI")
MAX_FRAME = 1 << 20


def encode(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def exit_frame(code: int, signal: int = 0) -> bytes:
    return encode(EXIT, json.dumps({"code": code, "signal": signal}).encode())


def winsize_frame(rows: int, cols: int) -> bytes:
    return encode(WINSIZE, struct.pack(">HH", rows, cols))


class FrameParser:
    """Feed bytes, get complete frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Tuple[bytes, bytes]]:
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes is larger than {MAX_FRAME}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[_HEADER.size:end])
            del self._buffer[:end]
            yield kind, payload

