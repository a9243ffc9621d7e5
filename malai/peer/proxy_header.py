"""PROXY protocol v2 headers carrying the caller's verified ID52 (see docs/tcp.md).

A machine sends one before the first relayed byte to a TCP upstream whose
service says ``proxy_protocol = true``. The addresses are the peer link's
(the caller as this machine sees it) and the upstream's; the caller's ID52
travels in a TLV of type ``TLV_CLIENT_ID52`` (0xE0, the first of the range the
spec leaves to applications), and its name in the cluster, when known, in
``TLV_CLIENT_NAME`` (0xE1).
"""

import ipaddress
import struct
from typing import Dict, Optional, Tuple

__all__ = ["SIGNATURE", "TLV_CLIENT_ID52", "TLV_CLIENT_NAME", "parse", "proxy_v2"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
TLV_CLIENT_ID52 = 0xE0
TLV_CLIENT_NAME = 0xE1
_PROXY = 0x21  # version 2, command PROXY
_FAMILIES = {4: (0x11, 4), 6: (0x21, 16)}  # TCP over IPv4 / IPv6: (family byte, address size)


def proxy_v2(source: Tuple[str, int], destination: Tuple[str, int], id52: str, name: str = "") -> bytes:
    """The header for a stream from ``source`` to ``destination`` on behalf of ``id52``."""
    tlvs = _tlv(TLV_CLIENT_ID52, id52.encode())
    if name:
        tlvs += _tlv(TLV_CLIENT_NAME, name.encode())
    src, dst = _ip(source[0]), _ip(destination[0])
    if src is not None and dst is not None and src.version == dst.version:
        family, _ = _FAMILIES[src.version]
        addresses = src.packed + dst.packed + struct.pack(">HH", source[1], destination[1])
    else:
        family, addresses = 0x00, b""  # UNSPEC: the receiver uses the connection's own addresses
    body = addresses + tlvs
    return SIGNATURE + struct.pack(">BBH", _PROXY, family, len(body)) + body


def parse(data: bytes) -> Tuple[Optional[Tuple[str, int, str, int]], Dict[int, bytes], int]:
    """(source host, port, destination host, port) or None, the TLVs, and the header's length.

    The reading side of ``proxy_v2``, for upstreams written in Python and for tests.
    Raises ValueError on anything that is not a complete v2 header."""
    if len(data) < 16 or not data.startswith(SIGNATURE):
        raise ValueError("not a PROXY protocol v2 header")
    command, family, length = struct.unpack_from(">BBH", data, 12)
    if command >> 4 != 2:
        raise ValueError(f"PROXY protocol version {command >> 4}, not 2")
    end = 16 + length
    if len(data) < end:
        raise ValueError("truncated PROXY protocol header")
    body, addresses = data[16:end], None
    size = {0x11: 4, 0x21: 16}.get(family)
    offset = 0
    if size is not None:
        if len(body) < 2 * size + 4:
            raise ValueError("PROXY protocol header too short for its addresses")
        src = ipaddress.ip_address(body[:size])
        dst = ipaddress.ip_address(body[size:2 * size])
        sport, dport = struct.unpack_from(">HH", body, 2 * size)
        addresses = (str(src), sport, str(dst), dport)
        offset = 2 * size + 4
    tlvs = {}
    while offset + 3 <= len(body):
        kind, tlv_length = struct.unpack_from(">BH", body, offset)
        if offset + 3 + tlv_length > len(body):
            raise ValueError("truncated PROXY protocol TLV")
        tlvs[kind] = body[offset + 3:offset + 3 + tlv_length]
        offset += 3 + tlv_length
    return addresses, tlvs, end


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack(">BH", kind, len(value)) + value


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
