"""``Report``: what a rescan did to one part of the daemon."""

from typing import Sequence

import attrs

__all__ = ["Report"]


@attrs.frozen
class Report:
    """What a rescan did (or, with check, would do) to one cluster."""

    cluster: str
    action: str  # added, removed, reloaded, unchanged, refused
    problems: Sequence[str] = ()

    def as_dict(self) -> dict:
        return {"cluster": self.cluster, "action": self.action, "problems": list(self.problems)}
