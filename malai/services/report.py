"""``Report``: what a rescan did to one part of the daemon."""

from typing import Optional, Sequence

import attrs

__all__ = ["Report", "change"]


@attrs.frozen
class Report:
    """What a rescan did (or, with check, would do) to one cluster."""

    cluster: str
    action: str  # added, removed, reloaded, unchanged, refused
    problems: Sequence[str] = ()

    def as_dict(self) -> dict:
        return {"cluster": self.cluster, "action": self.action, "problems": list(self.problems)}


def change(current, wanted) -> Optional[str]:
    """What replacing ``current`` by ``wanted`` does (None when they are equal)."""
    if wanted == current:
        return None
    return "removed" if wanted is None else "added" if current is None else "reloaded"
