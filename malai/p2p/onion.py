"""Tor onion addresses from identities (see docs/security.md).

An ID52 *is* an ed25519 public key, and a v3 onion address is an encoding of
one: any member computes a peer's onion address from its ID52, no directory
needed. The daemon hosts that onion service with the identity's own key.
"""

import base64
import hashlib

from malai.identity import Identity, decode_id52

__all__ = ["ONION_PORT", "onion_address", "onion_secret"]

#: The virtual port of every malai onion service.
ONION_PORT = 7420


def onion_address(id52: str) -> str:
    """``<56 characters>.onion`` of the identity ``id52`` (rend-spec-v3, 6)."""
    public = decode_id52(id52)
    checksum = hashlib.sha3_256(b".onion checksum" + public + b"\x03").digest()[:2]
    return base64.b32encode(public + checksum + b"\x03").decode().lower() + ".onion"


def onion_secret(identity: Identity) -> str:
    """The key blob for Tor's ``ADD_ONION``: the expanded ed25519 secret of the identity."""
    h = bytearray(hashlib.sha512(bytes(identity.signing_key)[:32]).digest())
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return "ED25519-V3:" + base64.b64encode(bytes(h)).decode()
