"""Reading an exchange as the tests do: the newest version that loads."""

from __future__ import annotations

from codistill.exchange import Exchange, Published


def newest(ex: Exchange, replica: int) -> Published | None:
    """``replica``'s newest version that loads (one that fails its checks is skipped), or None."""
    for step in reversed(ex.versions(replica)):
        published = ex.load(replica, step)
        if published is not None:
            return published
    return None
