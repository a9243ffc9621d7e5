"""A minimal stdlib AMP box codec, for the ``malai`` command's fast exec path."""

import struct
from typing import Dict, Optional

__all__ = ["decode_box", "encode_box", "read_box"]


def encode_box(box: Dict[bytes, bytes]) -> bytes:
    out = bytearray()
    for key, value in box.items():
        out += struct.pack(">H", len(key)) + key + struct.pack(">H", len(value)) + value
    return bytes(out + b"\x00\x00")


def decode_box(data: bytes) -> Optional[tuple]:
    """(box, bytes used) when ``data`` holds a whole box, else None."""
    box: Dict[bytes, bytes] = {}
    i = 0
    while True:
        if len(data) < i + 2:
            return None
        (n,) = struct.unpack_from(">H", data, i)
        i += 2
        if n == 0:
            return box, i
        if len(data) < i + n + 2:
            return None
        key = data[i:i + n]
        i += n
        (m,) = struct.unpack_from(">H", data, i)
        i += 2
        if len(data) < i + m:
            return None
        box[key] = data[i:i + m]
        i += m


def read_box(sock, buffer: bytearray) -> Dict[bytes, bytes]:
    """Read one box from a blocking socket; leftover bytes stay in ``buffer``."""
    while True:
        decoded = decode_box(bytes(buffer))
        if decoded is not None:
            box, used = decoded
            del buffer[:used]
            return box
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        buffer += data
