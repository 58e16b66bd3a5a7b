"""What the framework integrations share: ψ over chosen positions, and the replica's group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..codistiller import Codistiller, as_logits, prediction
from ..losses import distill_loss

IGNORE_INDEX = -100  # label of a position no loss counts (PyTorch's and Hugging Face's convention)


def masked_distill_loss(cd: Codistiller, inputs: Any, outputs: Any, step: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """``cd.distill_loss(inputs, outputs, step)``, with ψ averaged over the positions where
    ``mask`` (shaped like the prediction without its last axis, e.g. ``[batch, tokens]``) is
    true: padding and unlabelled tokens do not count. ``mask=None``: every position counts."""
    if mask is None:
        return cd.distill_loss(inputs, outputs, step)
    logits = as_logits(prediction(outputs), cd.outputs, cd.distill)
    if tuple(mask.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit predictions of shape "
                         f"{tuple(logits.shape)} (it should be {tuple(logits.shape[:-1])})")
    target = cd.distill_target(inputs, step)
    if target is None:
        return logits.new_zeros(())
    a, probs = target
    keep = mask.to(device=logits.device, dtype=torch.bool)
    logits, probs = logits[keep], probs[keep]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return a * distill_loss(logits, probs.to(logits.dtype), cd.distill, cd.temperature)


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
    if cd.process_group is None and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1:
        cd.process_group = dist.group.WORLD
    return cd
