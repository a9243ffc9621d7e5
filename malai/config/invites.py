"""Invites: one-time secrets with which a new device joins a cluster as a named machine.

The manager keeps ``invites.json`` (mode 0600) in the cluster's folder: per invite an id, the
machine name, the groups it joins, its expiry and the SHA-256 of its secret (never the secret).
The token the admin hands over carries the manager's ID52 and addresses, the cluster's name, the
machine name and the secret (``malai-join:`` and base64url JSON, one line). ``redeem`` takes an
invite out for good, whatever follows: an invite works once.
"""

import base64
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import List, Optional, Tuple

import attrs
import tomlkit

from malai.atomic import locked, write_atomic
from malai.config.reader import check_addr, check_name
from malai.errors import MalaiError
from malai.identity import ID52Error, parse_id52

__all__ = ["MAX_TOKEN", "Invite", "InviteRefused", "InviteStore", "Token", "add_machine", "parse_duration"]

PREFIX = "malai-join:"
MAX_TOKEN = 4096  # characters; a token names a handful of addresses
MAX_INVITES = 1000  # pending at once per cluster
KEEP_EXPIRED = 86400.0  # seconds an expired invite is kept, so that its token is refused as "expired"


class InviteRefused(MalaiError):
    """A join secret that is unknown, used already, expired or revoked."""


@attrs.frozen
class Token:
    """What a joining device needs: whom to dial, where, the secret, and its name there."""

    manager: str
    cluster: str
    name: str
    secret: str
    addrs: Tuple[str, ...] = ()

    def encode(self) -> str:
        body = json.dumps({"v": 1, "m": self.manager, "c": self.cluster, "n": self.name, "s": self.secret,
                           "a": list(self.addrs)}, separators=(",", ":"))
        return PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "Token":
        text = text.strip()
        if not text.startswith(PREFIX) or len(text) > MAX_TOKEN:
            raise MalaiError("not an invite token: it starts with malai-join: (copy the whole line that "
                             "`malai cluster invite` printed)")
        try:
            data = json.loads(base64.urlsafe_b64decode(text[len(PREFIX):] + "=" * (-len(text) % 4)))
            token = cls(parse_id52(data["m"]), data["c"], data["n"], data["s"], tuple(data.get("a", ())))
        except (ValueError, KeyError, TypeError, ID52Error):
            raise MalaiError("the invite token is damaged: copy the whole line again") from None
        problems = [p for p in (check_name(token.cluster), check_name(token.name),
                                *(check_addr(a) for a in token.addrs)) if p]
        if problems or not isinstance(token.secret, str) or not token.secret or len(token.addrs) > 16:
            raise MalaiError(f"the invite token is damaged: {'; '.join(map(str, problems)) or 'bad fields'}")
        return token


@attrs.frozen
class Invite:
    id: str
    name: str
    groups: Tuple[str, ...]
    expires: float
    secret_sha256: str
    created: float = 0.0
    allow_from: str = ""  # the new machine's allow_from; "": nobody

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "groups": list(self.groups), "allow_from": self.allow_from,
                "expires": self.expires, "created": self.created}


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``7d`` (or plain seconds) in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        value = 0
    if not 0 < value <= 366 * 86400:
        raise MalaiError(f"{text!r} is not a duration: write 90s, 30m, 1h or 7d (at most a year)")
    return value


class InviteStore:
    """``invites.json`` of a cluster the device manages."""

    def __init__(self, folder: Path):
        self.path = folder / "invites.json"
        self.lock = folder / ".invites.lock"

    def _load(self) -> List[Invite]:
        try:
            data = json.loads(self.path.read_text())
            return [Invite(d["id"], d["name"], tuple(d["groups"]), float(d["expires"]), d["secret_sha256"],
                           float(d.get("created", 0)), d.get("allow_from", "")) for d in data]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as e:
            raise MalaiError(f"{self.path}: unreadable ({e}); remove it to drop every pending invite") from None

    def _save(self, invites: List[Invite]) -> None:
        write_atomic(self.path, json.dumps([attrs.asdict(i) for i in invites], indent=1).encode(), mode=0o600)

    def pending(self, now: Optional[float] = None) -> List[Invite]:
        """Invites not yet used, revoked or expired."""
        now = time.time() if now is None else now
        try:
            return [i for i in self._load() if i.expires > now]
        except MalaiError:
            return []

    def create(self, *args) -> Tuple[Invite, str]:
        with locked(self.lock):
            return self._create(*args)

    def _create(self, name: str, groups: Tuple[str, ...], lifetime: float, allow_from: str = "") -> Tuple[Invite, str]:
        """A new invite and its secret (shown once, never stored)."""
        now = time.time()
        invites = [i for i in self._load() if i.expires > now - KEEP_EXPIRED]
        if any(i.name == name and i.expires > now for i in invites):
            raise MalaiError(f"an invite for {name!r} is pending already; revoke it first "
                             f"(`malai cluster invites <cluster> --revoke ID`)")
        if sum(i.expires > now for i in invites) >= MAX_INVITES:
            raise MalaiError(f"{len(invites)} invites are pending; revoke some first")
        secret = base64.b32encode(secrets.token_bytes(20)).decode().lower()
        invite = Invite(secrets.token_hex(4), name, groups, now + lifetime, _digest(secret), now, allow_from)
        self._save([*invites, invite])
        return invite, secret

    def revoke(self, invite_id: str) -> Invite:
        with locked(self.lock):
            return self._revoke(invite_id)

    def _revoke(self, invite_id: str) -> Invite:
        invites = self._load()
        for invite in invites:
            if invite.id == invite_id:
                self._save([i for i in invites if i is not invite])
                return invite
        raise MalaiError(f"no invite {invite_id!r}; `malai cluster invites <cluster>` lists them")

    def redeem(self, secret: str, now: Optional[float] = None) -> Invite:
        """Take the invite whose secret this is out of the store, once; InviteRefused otherwise."""
        with locked(self.lock):
            return self._redeem(secret, now)

    def _redeem(self, secret: str, now: Optional[float] = None) -> Invite:
        now = time.time() if now is None else now
        digest = _digest(secret)
        invites = self._load()
        found = next((i for i in invites if hmac.compare_digest(i.secret_sha256, digest)), None)
        kept = [i for i in invites if i is not found and i.expires > now - KEEP_EXPIRED]
        if kept != invites:
            self._save(kept)
        if found is None:
            raise InviteRefused("this invite is not valid: unknown, used already or revoked; ask the cluster's "
                                "admin for a new one")
        if found.expires <= now:
            raise InviteRefused("this invite has expired; ask the cluster's admin for a new one")
        return found


def add_machine(text: str, name: str, id52: str, invite: Invite) -> str:
    """``cluster.toml`` with ``[machine.NAME]`` added as ``invite`` says and NAME in each of its groups (comments
    and layout kept); MalaiError when the name is taken or a group is missing."""
    doc = tomlkit.parse(text)
    machines = doc.setdefault("machine", tomlkit.table(is_super_table=True))
    if name in machines:
        raise MalaiError(f"cluster.toml has a machine {name!r} already")
    for group in invite.groups:
        table = doc.get("group", {}).get(group)
        if table is None:
            raise MalaiError(f"cluster.toml has no group {group!r}")
        members = str(table.get("members", "")).strip()
        table["members"] = f"{members}, {name}" if members else name
    machine = tomlkit.table()
    machine.add(tomlkit.comment(f"joined with invite {invite.id}"))
    machine["id52"] = id52
    if invite.allow_from:
        machine["allow_from"] = invite.allow_from
    machines[name] = machine
    return tomlkit.dumps(doc)

