"""Header rules of the HTTP proxy: what passes, what is stripped, what malai adds."""

from typing import Iterable, List, Optional, Set, Tuple

import attrs

__all__ = ["Caller", "HEAD_TIMEOUT", "HOP_BY_HOP", "IDENTITY_HEADERS", "MAX_HEAD", "framing_problem", "is_upgrade",
           "request_headers", "response_headers"]

Headers = List[Tuple[bytes, bytes]]

#: The largest request or response head malai reads (h11's ``max_incomplete_event_size``, the front's buffer).
MAX_HEAD = 64 * 1024
#: Seconds a connection may stay without a complete request head: from its start (the front) or from the
#: end of the previous exchange (the machine: the keep-alive idle timeout).
HEAD_TIMEOUT = 10.0

#: RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
#: What the machine says about the verified caller; a caller's own ``malai-client-*`` headers never pass.
IDENTITY_HEADERS = (b"malai-client-id52", b"malai-client-machine", b"malai-client-cluster")
#: What malai says about where a request came from; a caller's own copies never pass either.
FORWARDING_HEADERS = frozenset({b"forwarded", b"x-real-ip", b"x-forwarded-for", b"x-forwarded-host",
                                b"x-forwarded-proto"})
#: Headers that say where a message ends: no hop may be told to drop them.
FRAMING = frozenset({b"content-length", b"transfer-encoding"})


@attrs.frozen
class Caller:
    """The verified peer of a link, as the upstream is told about it."""

    id52: str
    name: str  # its machine name in the cluster, "" when the config does not name it
    cluster: str
    address: str  # the link's remote host


def _connection_tokens(headers: Iterable[Tuple[bytes, bytes]]) -> Set[bytes]:
    tokens: Set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def is_upgrade(headers: Headers) -> bool:
    return b"upgrade" in _connection_tokens(headers) and any(n == b"upgrade" for n, _ in headers)


def _end_to_end(headers: Headers, keep_upgrade: bool) -> Headers:
    """``headers`` without hop-by-hop ones (those named in Connection too); an
    upgrade keeps ``Upgrade`` and ``Connection: upgrade``."""
    drop = HOP_BY_HOP | _connection_tokens(headers)
    out = [(n, v) for n, v in headers if n not in drop]
    if keep_upgrade:
        out += [(n, v) for n, v in headers if n == b"upgrade"] + [(b"connection", b"upgrade")]
    return out


def _chunked(headers: Headers) -> bool:
    return any(n == b"transfer-encoding" for n, _ in headers)


def framing_problem(headers: Headers) -> Optional[str]:
    """Why a request's length is ambiguous (RFC 9112 6.3), or None; h11 refuses the other cases
    (differing Content-Length, a Transfer-Encoding other than ``chunked``)."""
    names = {n for n, _ in headers}
    if FRAMING <= names:
        return "a request with both Content-Length and Transfer-Encoding"
    listed = sorted(FRAMING & _connection_tokens(headers))
    if listed:
        return f"Connection names {b', '.join(listed).decode()}, which says where the request ends"
    return None


def _spoofable(name: bytes) -> bool:
    """Whether ``name`` is, or would read as, a header malai sets, or as one that says how to read a
    message (CGI and WSGI read ``_`` as ``-``)."""
    dashed = name.replace(b"_", b"-")
    return (dashed.startswith(b"malai-client-") or dashed in FORWARDING_HEADERS
            or (dashed != name and dashed in HOP_BY_HOP | FRAMING | {b"host"}))


def request_headers(headers: Headers, caller: Caller, upstream_host: str, inject: bool) -> Headers:
    """What the upstream receives: end-to-end headers, ``Host`` naming the upstream,
    ``X-Forwarded-*`` from this hop alone, and (with ``inject``) the verified caller."""
    upgrade = is_upgrade(headers)
    out = [(n, v) for n, v in _end_to_end(headers, upgrade) if n != b"host" and not _spoofable(n)]
    host = _first(headers, b"host")
    out = [(b"host", upstream_host.encode()), *out, (b"x-forwarded-for", caller.address.encode()),
           (b"x-forwarded-proto", b"http")]
    if host is not None:
        out.append((b"x-forwarded-host", host))
    if inject:
        out += zip(IDENTITY_HEADERS, (caller.id52.encode(), caller.name.encode(), caller.cluster.encode()), strict=True)
    if _chunked(headers):  # the body keeps streaming, re-chunked
        out = _without_length(out) + [(b"transfer-encoding", b"chunked")]
    return out


def response_headers(headers: Headers, status: int) -> Headers:
    """What the caller receives: end-to-end headers (a 101 keeps its upgrade); h11 frames a chunked body anew."""
    out = _end_to_end(headers, keep_upgrade=status == 101 and is_upgrade(headers))
    return _without_length(out) if _chunked(headers) else out


def _without_length(headers: Headers) -> Headers:
    """A chunked message never also carries a Content-Length on to the next hop."""
    return [(n, v) for n, v in headers if n != b"content-length"]


def _first(headers: Headers, name: bytes) -> Optional[bytes]:
    for n, v in headers:
        if n == name:
            return v
    return None
