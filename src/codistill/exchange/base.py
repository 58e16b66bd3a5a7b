"""What every exchange offers: publish a replica's weights, find and load peers' versions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Published:
    """One published version of a replica's weights."""

    replica: int
    step: int
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DataParallel wrappers (other modules are returned as they are)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(module, (DistributedDataParallel, DataParallel)):
        module = module.module
    return module


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of ``module``'s state (unwraps DDP)."""
    module = unwrap(module)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


class Exchange(ABC):
    """Where replicas publish their weights and read their peers'."""

    durable = True  # versions outlive the process (a resumed replica republishes a lost one)
    wait_seconds = 0.0  # time the training thread spent waiting for writes

    @abstractmethod
    def publish(
        self, replica: int, step: int, state: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> int:
        """Store ``state`` as ``replica``'s version at ``step``; return the bytes written."""

    @abstractmethod
    def versions(self, replica: int) -> list[int]:
        """Steps of ``replica``'s published versions, oldest first (validity not checked)."""

    @abstractmethod
    def load(self, replica: int, step: int) -> Published | None:
        """Load one version; None if it is missing or fails its integrity check."""

    def latest(self, replica: int, max_step: int | None = None) -> Published | None:
        """The newest valid version of ``replica`` (at most ``max_step``), or None."""
        for step in reversed(self.versions(replica)):
            if max_step is not None and step > max_step:
                continue
            published = self.load(replica, step)
            if published is not None:
                return published
        return None

    def clear(self, replica: int) -> None:
        """Delete every published version of ``replica`` (a fresh start of that replica)."""
        raise NotImplementedError(f"{type(self).__name__} cannot clear versions")

    def flush(self) -> None:
        """Wait until every version published so far is readable."""

    def close(self) -> None:
        """Wait for pending writes and release resources."""
