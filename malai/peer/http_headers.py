"""Header rules of the HTTP proxy: what passes, what is stripped, what malai adds."""

from typing import Iterable, List, Optional, Set, Tuple

import attrs

__all__ = ["Caller", "HOP_BY_HOP", "IDENTITY_HEADERS", "is_upgrade", "request_headers", "response_headers"]

Headers = List[Tuple[bytes, bytes]]

#: RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
#: What the machine says about the verified caller; a caller's own copies never pass.
IDENTITY_HEADERS = (b"malai-client-id52", b"malai-client-machine", b"malai-client-cluster")


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
    return any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers)


def request_headers(headers: Headers, caller: Caller, upstream_host: str, inject: bool) -> Headers:
    """What the upstream receives: end-to-end headers, ``Host`` naming the upstream,
    ``X-Forwarded-*``, and (with ``inject``) the verified caller."""
    upgrade = is_upgrade(headers)
    out = [(n, v) for n, v in _end_to_end(headers, upgrade)
           if n not in IDENTITY_HEADERS and n not in (b"host", b"x-forwarded-host", b"x-forwarded-proto")]
    host = _first(headers, b"host")
    forwarded_for = [v for n, v in out if n == b"x-forwarded-for"]
    out = [(n, v) for n, v in out if n != b"x-forwarded-for"]
    chain = b", ".join([*forwarded_for, caller.address.encode()])
    out = [(b"host", upstream_host.encode()), *out, (b"x-forwarded-for", chain), (b"x-forwarded-proto", b"http")]
    if host is not None:
        out.append((b"x-forwarded-host", host))
    if inject:
        out += [(b"malai-client-id52", caller.id52.encode()), (b"malai-client-machine", caller.name.encode()),
                (b"malai-client-cluster", caller.cluster.encode())]
    if _chunked(headers):
        out.append((b"transfer-encoding", b"chunked"))  # the body keeps streaming, re-chunked
    return out


def response_headers(headers: Headers, status: int) -> Headers:
    """What the caller receives: end-to-end headers (a 101 keeps its upgrade)."""
    return _end_to_end(headers, keep_upgrade=status == 101 and is_upgrade(headers))


def _first(headers: Headers, name: bytes) -> Optional[bytes]:
    for n, v in headers:
        if n == name:
            return v
    return None
