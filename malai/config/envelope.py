"""Signed config envelopes: how a machine knows a config really comes from its manager.

The signature covers the manager's and the target machine's ID52, the
version and the SHA-256 of the body, so an envelope cannot be replayed to
another machine, rolled back, or altered.
"""

import hashlib
from typing import Optional

import attrs

from malai.identity import Identity, verify

__all__ = ["Envelope"]

_DOMAIN = b"malai config envelope v1\n"


@attrs.frozen
class Envelope:
    cluster: str  # the cluster manager's ID52
    machine: str  # the target machine's ID52
    version: int
    sha256: str  # of body
    body: str
    signature: bytes

    @classmethod
    def seal(cls, manager: Identity, machine: str, version: int, body: str) -> "Envelope":
        sha = hashlib.sha256(body.encode()).hexdigest()
        unsigned = cls(manager.id52, machine, version, sha, body, b"")
        return attrs.evolve(unsigned, signature=manager.sign(unsigned.signed_bytes()))

    def signed_bytes(self) -> bytes:
        return _DOMAIN + f"{self.cluster}\n{self.machine}\n{self.version}\n{self.sha256}\n".encode()

    def problem(self, manager: str, machine: str) -> Optional[str]:
        """Why this envelope must be refused by ``machine`` whose manager is ``manager``; None if sound."""
        if self.cluster != manager:
            return f"envelope names manager {self.cluster}, this machine's manager is {manager}"
        if self.machine != machine:
            return f"envelope is for machine {self.machine}, not for {machine}"
        if hashlib.sha256(self.body.encode()).hexdigest() != self.sha256:
            return "body does not match the envelope's sha256"
        if not verify(manager, self.signed_bytes(), self.signature):
            return f"signature does not verify against the manager's key {manager}"
        return None
