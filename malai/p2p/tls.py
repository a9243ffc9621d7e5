"""TLS 1.3 where both sides present a self-signed certificate over their identity key.

There is no CA and no trust on first use: TLS 1.3's CertificateVerify proves
the peer holds the key of its leaf certificate, so pinning that key to an
ID52 is the whole check. The dialer names the ID52 it wants as SNI; one
listening port serves every identity in ``PeerTLS`` and takes the client's
ID52 from its certificate.
"""

import datetime
from typing import Callable, Dict, Iterable, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from zope.interface import implementer

from malai.identity import Identity, encode_id52

__all__ = ["ALPN", "PeerTLS", "make_certificate", "peer_id52_of", "presented_id52"]

ALPN = b"malai/2"
_VERIFY = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT


def make_certificate(identity: Identity) -> tuple:
    """A self-signed X.509 certificate over the identity's ed25519 key."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(identity.signing_key))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.id52)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{identity.id52}.malai")]), critical=False)
        .sign(key, algorithm=None)
    )
    return key, cert


def presented_id52(cert) -> Optional[str]:
    """The ID52 of a certificate's key, or None when it is not an ed25519 key."""
    public = cert.public_key()
    if not isinstance(public, Ed25519PublicKey):
        return None
    return encode_id52(public.public_bytes(Encoding.Raw, PublicFormat.Raw))


def peer_id52_of(connection: SSL.Connection) -> Optional[str]:
    """The verified ID52 of the peer of a completed handshake."""
    cert = connection.get_peer_certificate(as_cryptography=True)
    return presented_id52(cert) if cert is not None else None


@attrs.define
class Verdict:
    """What the verify callback saw, kept for the error message."""

    expected: Optional[str] = None
    presented: Optional[str] = None
    problem: Optional[str] = None


def _verifier(verdict: Verdict) -> Callable:
    def verify(conn, cert, errno, depth, ok) -> bool:
        # Path errors (self-signed, dates) are irrelevant: the leaf key is the identity.
        if depth != 0:
            verdict.problem = "the peer sent a certificate chain; malai peers present one self-signed leaf"
            return False
        verdict.presented = presented_id52(cert.to_cryptography())
        if verdict.presented is None:
            verdict.problem = "the peer's certificate key is not ed25519"
            return False
        if verdict.expected is not None and verdict.presented != verdict.expected:
            verdict.problem = f"expected {verdict.expected}, the peer presented {verdict.presented}"
            return False
        return True

    return verify


def _context(identity: Identity) -> SSL.Context:
    key, cert = make_certificate(identity)
    options = CertificateOptions(
        privateKey=key, certificate=cert, raiseMinimumTo=TLSVersion.TLSv1_3,
        acceptableProtocols=[ALPN],
    )
    ctx = options.getContext()
    ctx.set_verify(_VERIFY, _verifier(Verdict()))
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class PeerTLS:
    """TLS contexts for every local identity; a server that routes by SNI.

    ``verdicts`` maps each TLS protocol to what its verify callback saw, so a
    failed handshake can name the expected and the presented ID52.
    """

    def __init__(self, identities: Iterable[Identity] = ()):
        self._contexts: Dict[str, SSL.Context] = {}
        self._default = SSL.Context(SSL.TLS_METHOD)
        self._default.set_min_proto_version(SSL.TLS1_3_VERSION)
        self._default.set_verify(_VERIFY, _verifier(Verdict()))
        self._default.set_tlsext_servername_callback(self._pick_context)
        for identity in identities:
            self.add(identity)

    def add(self, identity: Identity) -> None:
        if identity.id52 not in self._contexts:
            self._contexts[identity.id52] = _context(identity)

    def remove(self, id52: str) -> None:
        self._contexts.pop(id52, None)

    def __contains__(self, id52: str) -> bool:
        return id52 in self._contexts

    def _pick_context(self, conn: SSL.Connection) -> None:
        name = (conn.get_servername() or b"").decode("ascii", "replace").lower()
        ctx = self._contexts.get(name)
        if ctx is not None:
            conn.set_context(ctx)
        # An unknown name keeps the default context, which has no certificate:
        # the handshake fails and the dialer learns this port holds no such identity.

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self._default, None)
        verdict = Verdict()
        tlsProtocol.malai_verdict = verdict
        conn.set_verify(_VERIFY, _verifier(verdict))
        return conn

    def client_for(self, local: Identity, expected: str) -> "ClientTLS":
        self.add(local)
        return ClientTLS(self._contexts[local.id52], expected)


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen
class ClientTLS:
    """The client side of one link: this context, pinned to ``expected``."""

    context: SSL.Context
    expected: str

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        verdict = Verdict(expected=self.expected)
        tlsProtocol.malai_verdict = verdict
        conn.set_verify(_VERIFY, _verifier(verdict))
        conn.set_tlsext_host_name(self.expected.encode("ascii"))
        conn.set_alpn_protos([ALPN])
        return conn
