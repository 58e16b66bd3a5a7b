"""In-memory exchange for replicas that live in one process."""

from __future__ import annotations

import copy
from typing import Any

import torch

from .base import Check, Exchange, Published, state_nbytes


class MemoryExchange(Exchange):
    """Keeps the last ``keep`` versions of each replica in a dict."""

    durable = False

    def __init__(self, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._store: dict[int, dict[int, Published]] = {}

    def publish(
        self, replica: int, step: int, state: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> int:
        state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        nbytes = state_nbytes(state)
        versions = self._store.setdefault(replica, {})
        versions[step] = Published(replica, step, state, copy.deepcopy(meta), nbytes)
        for old in sorted(versions)[: -self.keep]:
            del versions[old]
        return nbytes

    def versions(self, replica: int) -> list[int]:
        return sorted(self._store.get(replica, {}))

    def load(self, replica: int, step: int, check: Check | None = None) -> Published | None:
        published = self._store.get(replica, {}).get(step)
        if published is None:
            return None
        return self._checked(published, check, f"replica {replica} step {step}")

    def ident(self, replica: int, step: int) -> str | None:
        # One process: a replica cannot crash and publish a step again without its peers.
        return "" if step in self._store.get(replica, {}) else None

    def clear(self, replica: int) -> None:
        self._store.pop(replica, None)
