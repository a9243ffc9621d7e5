"""Ed25519 identities and their ID52 names.

An ID52 is the 32-byte public key in lowercase RFC 4648 base32hex without
padding: 52 characters, the last one ``0`` or ``g``. A secret key file holds
the 32-byte seed as one line of 64 lowercase hex characters, mode 0600.
"""

import base64
import os
import stat
from pathlib import Path

import attrs
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from malai.atomic import write_atomic
from malai.errors import MalaiError

__all__ = [
    "ID52Error",
    "Identity",
    "KeyFileError",
    "decode_id52",
    "encode_id52",
    "parse_id52",
    "verify",
]

_ALPHABET = frozenset("0123456789abcdefghijklmnopqrstuv")
ID52_LENGTH = 52


class ID52Error(MalaiError, ValueError):
    """A string that is not a valid ID52."""


class KeyFileError(MalaiError):
    """A secret key file that is missing, malformed or too open."""


def encode_id52(public_key: bytes) -> str:
    """The ID52 of a 32-byte public key."""
    if len(public_key) != 32:
        raise ValueError(f"an ed25519 public key has 32 bytes, not {len(public_key)}")
    return base64.b32hexencode(public_key).decode("ascii").rstrip("=").lower()


def parse_id52(text: str) -> str:
    """Validate ``text`` as an ID52 (any case) and return its canonical lowercase form."""
    if not isinstance(text, str):
        raise ID52Error(f"an ID52 must be a string, not {type(text).__name__}")
    s = text.strip().lower()
    if len(s) != ID52_LENGTH:
        raise ID52Error(f"{text!r} is not an ID52: it has {len(s)} characters, an ID52 has 52")
    bad = sorted(set(s) - _ALPHABET)
    if bad:
        raise ID52Error(
            f"{text!r} is not an ID52: {''.join(bad)!r} not in the base32hex alphabet 0-9a-v"
        )
    if s[-1] not in "0g":
        raise ID52Error(
            f"{text!r} is not an ID52: its last character must be '0' or 'g' "
            "(the trailing bits are not zero)"
        )
    return s


def decode_id52(text: str) -> bytes:
    """The 32-byte public key an ID52 names."""
    s = parse_id52(text)
    return base64.b32hexdecode(s.upper() + "====")


def verify(id52: str, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the ID52's key's signature over ``message``."""
    try:
        VerifyKey(decode_id52(id52)).verify(message, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


@attrs.frozen(repr=False)
class Identity:
    """A secret ed25519 key and the ID52 it answers to."""

    signing_key: SigningKey

    @classmethod
    def generate(cls) -> "Identity":
        return cls(SigningKey.generate())

    @classmethod
    def from_hex(cls, text: str) -> "Identity":
        s = text.strip()
        if len(s) != 64 or any(c not in "0123456789abcdefABCDEF" for c in s):
            raise KeyFileError("a secret key is 64 hex characters on one line")
        return cls(SigningKey(bytes.fromhex(s)))

    @classmethod
    def load(cls, path: Path) -> "Identity":
        """Read a key file, refusing one that group or others may read."""
        path = Path(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise KeyFileError(f"{path}: no key file here") from None
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{path}: key file is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 600 {path}"
            )
        text = path.read_text(encoding="ascii", errors="replace")
        if text.count("\n") > 1 or text.strip() != text.rstrip("\n"):
            raise KeyFileError(f"{path}: a key file holds one line of 64 hex characters")
        try:
            return cls.from_hex(text)
        except KeyFileError as e:
            raise KeyFileError(f"{path}: {e}") from None

    def save(self, path: Path) -> None:
        """Write the key to a new file, mode 0600; an existing file is never replaced."""
        try:
            write_atomic(Path(path), (self.secret_hex + "\n").encode(), mode=0o600, exclusive=True)
        except FileExistsError:
            raise KeyFileError(f"{path}: a key file already exists; not overwriting it") from None

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def id52(self) -> str:
        return encode_id52(self.public_key)

    @property
    def secret_hex(self) -> str:
        return bytes(self.signing_key).hex()

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def __repr__(self) -> str:
        return f"<Identity {self.id52}>"
