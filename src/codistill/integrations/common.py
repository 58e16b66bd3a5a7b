"""What the framework integrations share: which positions ψ counts, the replica's group, and
per-replica output paths."""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist

from ..codistiller import Codistiller

IGNORE_INDEX = -100  # label of a position no loss counts (PyTorch's and Hugging Face's convention)


def token_mask(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Positions whose prediction a token loss counts: ``labels != -100``, or for a causal LM
    (``shift``: position t predicts label t+1) the next position's label, the last none."""
    if not shift:
        return labels != IGNORE_INDEX
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return mask


def use_default_group(cd: Codistiller) -> Codistiller:
    """Under a framework's data parallelism (its processes are one replica), make the default
    process group the replica's, so that its first rank publishes and loads the teachers."""
    if cd.group.process_group is None and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1:
        cd.group.process_group = dist.group.WORLD
    return cd


def per_replica(path: str, replica: int) -> str:
    """``path/replica-R``, unless ``path`` names the replica already (``replica-R``,
    ``replica_R`` or ``replicaR`` in it, as ``codistill launch``'s ``{replica}`` may have made)."""
    if re.search(rf"replica[-_]?{replica}(?!\d)", path):
        return path
    return os.path.join(path, f"replica-{replica}")
