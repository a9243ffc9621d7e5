"""Sharing identities: named keys in ``$MALAI_HOME/identities/NAME.private-key``.

A sharing command (``malai tcp``, ``malai tcp-bridge``) runs as one of these
identities (``default`` unless ``--identity NAME``), created on first use, so
the ID52 a person gives out stays the same across runs. Files are written
atomically, mode 0600; a file group or others may read is refused, as every
key file is (``Identity.load``).
"""

import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from malai.atomic import write_atomic
from malai.errors import MalaiError, UsageError
from malai.identity import Identity, KeyFileError

__all__ = ["DEFAULT", "IdentityStore", "check_identity_name"]

DEFAULT = "default"
SUFFIX = ".private-key"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")


def check_identity_name(name: str) -> str:
    """``name`` if it is a valid identity name, else ``UsageError`` saying what one is."""
    if not _NAME.match(name):
        raise UsageError(f"{name!r} is not an identity name: use 1-63 lowercase letters, digits, '-' or '_', "
                         "starting with a letter or digit")
    return name


class IdentityStore:
    """The sharing identities of one MALAI_HOME."""

    def __init__(self, root: Path):
        self.folder = Path(root) / "identities"

    def path(self, name: str) -> Path:
        return self.folder / f"{check_identity_name(name)}{SUFFIX}"

    def names(self) -> List[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in self.folder.iterdir()
                      if p.name.endswith(SUFFIX) and _NAME.match(p.name[:-len(SUFFIX)]))

    def entries(self) -> List[Tuple[str, Optional[Identity], Optional[str]]]:
        """Every identity as (name, identity or None, the problem loading it or None)."""
        out = []
        for name in self.names():
            try:
                out.append((name, self.load(name), None))
            except KeyFileError as e:
                out.append((name, None, str(e)))
        return out

    def load(self, name: str) -> Identity:
        path = self.path(name)
        if not path.exists():
            raise KeyFileError(f"no identity {name!r} in {self.folder}; create it: malai identity create {name}")
        return Identity.load(path)

    def create(self, name: str, identity: Optional[Identity] = None) -> Identity:
        """Store a new identity (``identity``, or a fresh one) as ``name``; an existing one is never replaced."""
        path = self.path(name)
        identity = identity or Identity.generate()
        self._private_folder()
        try:
            write_atomic(path, (identity.secret_hex + "\n").encode(), mode=0o600, exclusive=True)
        except FileExistsError:
            raise MalaiError(f"identity {name!r} already exists ({path}); delete it first "
                             f"(malai identity delete {name}) or choose another name") from None
        return identity

    def load_or_create(self, name: str) -> Tuple[Identity, bool]:
        """The identity ``name`` and whether it was just created (only ``default`` is created on
        first use; any other name must exist)."""
        if name == DEFAULT and not self.path(name).exists():
            try:
                return self.create(name), True
            except MalaiError:
                pass  # another command created it meanwhile
        return self.load(name), False

    def delete(self, name: str) -> Optional[str]:
        """Remove ``name``'s key file; return the ID52 it held (None when the file was unusable)."""
        try:
            id52: Optional[str] = self.load(name).id52
        except KeyFileError:
            if not self.path(name).exists():
                raise
            id52 = None
        os.unlink(self.path(name))
        return id52

    def _private_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
