"""Task loss φ, distillation loss ψ and the distillation weight schedule α(step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import fused
from .fused import row_chunks
from .modules import as_logits, prediction

DISTILL_KINDS = ("kl", "ce", "bce")
TASK_KINDS = ("categorical", "binary")
PREDICTIONS = ("logits", "log_probs", "probs")  # what a model's prediction may be


def task_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "categorical") -> torch.Tensor:
    """φ: cross entropy over the last axis (classes/tokens), or logistic loss for clicks.

    Categorical: ``logits`` is ``[..., C]`` and ``targets`` integer ``[...]``.
    Binary: ``logits`` and ``targets`` (0/1) have the same shape.
    """
    if kind == "categorical":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")


def uniform_loss(logits: torch.Tensor, kind: str = "categorical") -> torch.Tensor:
    """Cross entropy toward the uniform distribution (a click probability of 0.5 for binary
    outputs). Label smoothing ε is ``(1-ε)·φ + ε·uniform_loss``: cross entropy is linear in
    its target, so this equals φ toward the smoothed labels."""
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))
    return -torch.log_softmax(logits.float(), dim=-1).mean(-1).mean()


def predict_probs(logits: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """The predicted distribution: softmax over the last axis, or a sigmoid for binary outputs."""
    if temperature != 1.0:
        logits = logits / temperature
    if kind == "bce":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    kind: str = "kl",
    temperature: float = 1.0,
) -> torch.Tensor:
    """ψ: loss of the student's logits toward the teachers' (averaged) probabilities, without
    the weight α (:meth:`Codistiller.distill_loss` returns α·ψ, the term added to a loss).

    ``kl``: KL(p_teacher || p_student), zero when they agree. ``ce``: soft-target cross
    entropy, which differs from ``kl`` by the teacher's entropy (a constant), so both give the
    same gradient. ``bce``: binary cross entropy toward an averaged click probability.
    With a temperature T ≠ 1 the loss is scaled by T² (Hinton et al.) so its gradient keeps
    the same magnitude. No gradient flows into ``teacher_probs``.
    """
    target = teacher_probs.detach()
    if target.shape != student_logits.shape:
        raise ValueError(
            f"teacher predictions have shape {tuple(target.shape)} but the student's logits "
            f"have shape {tuple(student_logits.shape)}"
        )
    t = float(temperature)
    if kind == "bce":
        if t == 1.0:
            return F.binary_cross_entropy_with_logits(student_logits, target)
        return F.binary_cross_entropy_with_logits(student_logits / t, target) * (t * t)
    if kind not in ("kl", "ce"):
        raise ValueError(f"distill kind must be one of {DISTILL_KINDS}, got {kind!r}")
    v = student_logits.shape[-1]
    return _SoftTargetLoss.apply(student_logits.reshape(-1, v), target.reshape(-1, v), t, kind == "kl")


def _soft_target_sum(p: torch.Tensor, logq: torch.Tensor, kl: bool) -> torch.Tensor:
    """Σ p·(log p − log q) (``kl``) or −Σ p·log q over a chunk, with 0·log 0 = 0.

    KL is summed term by term, not as cross entropy minus entropy: those two are each about
    log V and nearly equal when peers agree, so their difference would lose the relative
    precision of the small KL value."""
    if not kl:
        return -torch.vdot(p.reshape(-1), logq.reshape(-1))
    return torch.where(p > 0, p * (p.log() - logq), 0.0).sum()


class _SoftTargetLoss(torch.autograd.Function):
    """T²·mean over rows of KL(p ‖ softmax(z/T)) (``kl``) or CE(p, softmax(z/T)),
    computed in fp32 over chunks of rows, with the gradient T·(softmax(z/T)·Σp − p)/N written
    straight into the logits' gradient in the backward pass. No [rows, vocabulary] tensor is
    kept between the passes beyond the inputs themselves."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, p: torch.Tensor, t: float, kl: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for rows in row_chunks(*logits.shape, fused.CHUNK_ELEMENTS):
            z = logits[rows].float()
            pc = p[rows].float()
            logq = torch.log_softmax(z / t if t != 1.0 else z, dim=-1)
            total += _soft_target_sum(pc, logq, kl)
        ctx.save_for_backward(logits, p)
        ctx.t = t
        return total * (t * t / logits.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, p = ctx.saved_tensors
        t = ctx.t
        scale = grad_out.float() * (t / logits.shape[0])
        grad = torch.empty_like(logits)
        for rows in row_chunks(*logits.shape, fused.CHUNK_ELEMENTS):
            pc = p[rows].float()
            z = logits[rows].float()
            q = torch.softmax(z / t if t != 1.0 else z, dim=-1)
            q.mul_(pc.sum(-1, keepdim=True)).sub_(pc).mul_(scale)
            grad[rows] = q
        return grad, None, None, None


@dataclass(frozen=True)
class AlphaSchedule:
    """α(step): 0 before ``burn_in``, then rises linearly over ``ramp`` steps to ``alpha``.

    ``step`` counts optimizer steps taken so far (the step about to run is ``step``, 0-based).
    """

    alpha: float = 1.0
    burn_in: int = 0
    ramp: int = 0

    def __call__(self, step: int) -> float:
        if step < self.burn_in or self.alpha == 0.0:
            return 0.0
        if self.ramp <= 0:
            return self.alpha
        return self.alpha * min(1.0, (step - self.burn_in + 1) / self.ramp)

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.burn_in < 0 or self.ramp < 0:
            raise ValueError(f"alpha, burn_in and ramp must be >= 0, got {self.alpha}, {self.burn_in}, "
                             f"{self.ramp}")


@dataclass(frozen=True)
class DistillLoss:
    """ψ as a Codistiller computes it: ``kind`` ``"kl"``, ``"ce"`` (soft-target cross
    entropy) or ``"bce"`` (binary outputs), at softmax ``temperature`` (teachers' and
    student's), on models whose ``predictions`` are ``"logits"``, ``"log_probs"`` or
    ``"probs"`` (teachers' and student's alike)."""

    kind: str = "kl"
    temperature: float = 1.0
    predictions: str = "logits"

    def __post_init__(self) -> None:
        if self.kind not in DISTILL_KINDS:
            raise ValueError(f"loss kind must be one of {list(DISTILL_KINDS)}, got {self.kind!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.predictions not in PREDICTIONS:
            raise ValueError(f"predictions (outputs) must be one of {list(PREDICTIONS)}, got "
                             f"{self.predictions!r}")

    def logits(self, output: Any) -> torch.Tensor:
        """The prediction in a model's ``output`` (see :func:`prediction`) as logits."""
        return as_logits(prediction(output), self.predictions, self.kind)
