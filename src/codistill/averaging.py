"""Periodic weight averaging across replicas — the alternatives to codistillation at the
same communication budget (one exchange of weights every K steps):

- local SGD: every K steps the replicas' weights are replaced by their mean;
- DiLoCo (Douillard et al., 2023): every K steps the mean of the replicas' changes since the
  last sync is a pseudo-gradient for an outer SGD step with Nesterov momentum
  (``outer.lr`` 0.7, ``outer.momentum`` 0.9 in the paper) on the shared weights.

Local SGD is the outer step with lr 1 and no momentum, so one mechanism does both. Each
replica keeps the shared weights and the momentum itself (identical on every replica, as on
DiLoCo's workers), so its state is checkpointed with the replica.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .exchange import state_nbytes
from .modules import unwrap


class OuterSync:
    """One replica's side of the outer step: the anchor (shared weights at the last sync)
    and the outer momentum."""

    def __init__(self, model: nn.Module, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.model, self.lr, self.momentum = model, lr, momentum
        self.anchor = [p.detach().clone() for p in self._params()]
        self.velocity = [torch.zeros_like(p) for p in self.anchor]

    def _params(self) -> list[torch.Tensor]:
        return [p for p in unwrap(self.model).parameters()]

    def delta(self) -> list[torch.Tensor]:
        """The pseudo-gradient: anchor minus the current weights."""
        return [a - p.detach() for a, p in zip(self.anchor, self._params())]

    @torch.no_grad()
    def apply(self, mean_delta: list[torch.Tensor]) -> None:
        """Outer step with the replicas' mean pseudo-gradient; the weights become the anchor."""
        for a, v, d, p in zip(self.anchor, self.velocity, mean_delta, self._params()):
            if self.momentum:
                v.mul_(self.momentum).add_(d)
                d = d + self.momentum * v  # Nesterov
            a.sub_(self.lr * d)
            p.copy_(a)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.cpu() for a in self.anchor], "velocity": [v.cpu() for v in self.velocity]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.anchor + self.velocity, state["anchor"] + state["velocity"]):
            dst.copy_(src)


@torch.no_grad()
def average_buffers(models: list[nn.Module]) -> None:
    """Floating-point buffers (batch-norm statistics) become their mean across replicas."""
    bufs = [list(unwrap(m).buffers()) for m in models]
    for group in zip(*bufs):
        if group[0].is_floating_point():
            mean = torch.stack(group).mean(0)
            for b in group:
                b.copy_(mean)


def outer_sync(syncs: list[OuterSync]) -> int:
    """Average the replicas' pseudo-gradients and apply the outer step on each; return the
    bytes each replica sends (its pseudo-gradient; it receives as many back)."""
    deltas = [s.delta() for s in syncs]
    mean = [torch.stack(group).mean(0) for group in zip(*deltas)]
    for s in syncs:
        s.apply(mean)
    average_buffers([s.model for s in syncs])
    return state_nbytes(deltas[0])
