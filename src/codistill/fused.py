"""φ + α·ψ in one chunked pass over rows: from the student's and teachers' logits, or
(fused-linear) from hidden states and output matrices, so no [rows, vocabulary] tensor exists.

Each chunk of rows is read once: the student's log-softmax serves φ, ψ and the gradient;
the KL value is summed term by term from log-probabilities (one teacher's straight from its
logits), never as a cross entropy minus an entropy, which would lose its precision. The
gradient is written in the forward pass, chunk by chunk, and the backward pass only scales
it (Liger-Kernel's fused-linear losses do the same on GPUs). These are device-agnostic torch
ops; a Triton (or other fused) kernel would replace :func:`_chunk` alone, which sees one
chunk of rows at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 20  # rows × vocabulary per chunk of logits (4 MB per fp32 temporary)
LINEAR_CHUNK_ELEMENTS = 1 << 22  # rows × vocabulary per fused-linear chunk (16 MB per fp32 temporary) ...
LINEAR_MIN_ROWS = 128  # ... but at least this many rows: each chunk adds its [V, H] weight gradient once

Scale = float | torch.Tensor


class Losses(NamedTuple):
    """``total`` = φ + α·ψ (differentiable); ``phi`` and ``psi`` detached (φ is 0 without targets)."""

    total: torch.Tensor
    phi: torch.Tensor
    psi: torch.Tensor


def fused_loss(logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor],
               targets: torch.Tensor | None = None, alpha: float = 1.0, kind: str = "kl",
               temperature: float = 1.0, mask: torch.Tensor | None = None,
               phi_weight: Scale = 1.0) -> Losses:
    """φ + α·ψ of categorical ``logits`` ``[..., V]``: φ the cross entropy toward integer
    ``targets`` ``[...]`` (none: φ = 0), ψ the KL (``kind="kl"``) or soft-target cross entropy
    (``"ce"``, the same gradient) toward the mean of the teachers' softmaxes at ``temperature``
    T (scaled by T²), each a mean over the rows where ``mask`` (``[...]``, bool) is true.
    The teachers' logits are read chunk by chunk: no [rows, V] probability tensor is made.
    ``phi_weight`` w makes the total w·φ + α·ψ (e.g. a framework's own normalisation of φ)."""
    v = logits.shape[-1]
    z = logits.reshape(-1, v)
    ts = [_rows_of(t, logits, "teacher logits") for t in teacher_logits]
    y, keep = _targets_and_mask(targets, mask, logits.shape[:-1])
    weights = (phi_weight, float(alpha))
    total, phi, psi = _FusedLoss.apply(z, y, keep, weights, kind == "kl", float(temperature), ts)
    return Losses(total, phi, psi)


def fused_linear_loss(hidden: torch.Tensor, head: nn.Linear | torch.Tensor,
                      teachers: Sequence[tuple[torch.Tensor, nn.Linear | torch.Tensor]],
                      targets: torch.Tensor | None = None, alpha: float = 1.0, kind: str = "kl",
                      temperature: float = 1.0, mask: torch.Tensor | None = None,
                      phi_weight: Scale = 1.0) -> Losses:
    """:func:`fused_loss` of the logits ``head(hidden)`` (``head``: an ``nn.Linear`` or its
    weight ``[V, H]``), toward the teachers' ``head_j(hidden_j)`` (``teachers``: pairs of
    hidden states ``[..., H_j]`` and head), computed chunk by chunk of rows: neither the forward
    nor the backward pass holds a [rows, V] tensor. Gradients flow into ``hidden`` and the
    head's weight and bias."""
    h = hidden.reshape(-1, hidden.shape[-1])
    w, b = _weight_bias(head)
    ths = []
    for th, thead in teachers:
        if tuple(th.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(f"a teacher's hidden states have shape {tuple(th.shape)} but the student's have "
                             f"{tuple(hidden.shape)} (they must agree up to the last axis)")
        tw, tb = _weight_bias(thead)
        if tw.shape[0] != w.shape[0]:
            raise ValueError(f"a teacher's head predicts {tw.shape[0]} classes, the student's {w.shape[0]}")
        ths.append((th.reshape(-1, th.shape[-1]).detach(), tw.detach(), None if tb is None else tb.detach()))
    y, keep = _targets_and_mask(targets, mask, hidden.shape[:-1])
    total, phi, psi = _FusedLinearLoss.apply(h, w, b, y, keep, (phi_weight, float(alpha)), kind == "kl",
                                             float(temperature),
                                             ths)
    return Losses(total, phi, psi)


# -- one chunk of rows ------------------------------------------------------------------
class _Work:
    """Chunk-sized buffers for the temporaries of a pass, reused by every chunk and by the next
    pass of the same shape in this thread: fresh memory for each chunk would be paged in again
    and again, which costs as much as the arithmetic. Nothing in them outlives a pass."""

    _local = threading.local()

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.rows, self.width, self.device = rows, width, device
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @classmethod
    def get(cls, rows: int, width: int, device: torch.device) -> _Work:
        """This thread's buffers for chunks of ``rows`` × ``width`` (the last shape's are kept)."""
        work = getattr(cls._local, "work", None)
        if work is None or (work.rows, work.width, work.device) != (rows, width, device):
            work = cls._local.work = cls(rows, width, device)
        return work

    def __call__(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get((name, dtype))
        if buf is None:
            buf = torch.empty(self.rows, self.width, dtype=dtype, device=self.device)
            self.buffers[name, dtype] = buf
        return buf[:n]


def _chunk(z: torch.Tensor, ts: list[torch.Tensor], y: torch.Tensor | None, keep: torch.Tensor | None,
           t: float, kl: bool, grad: tuple[Scale, Scale] | None, work: _Work, out: torch.Tensor | None = None
           ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(Σ φ, Σ ψ/T², gradient) over one chunk of rows: ``z`` the student's logits ``[n, V]``,
    ``ts`` the teachers' (none: ψ = 0), ``y`` targets ``[n]`` (None: no φ), ``keep`` the rows
    counted ([n] bool, None: all). With ``grad = (c_φ, c_ψ)`` also the gradient
    c_φ·(softmax(z) − onehot(y)) + c_ψ·(softmax(z/T) − p) (zero on rows not kept), written
    into ``out`` when given (else into a buffer of ``work``)."""
    n, z = z.shape[0], _wide(z)
    lq = torch.log_softmax(z if t == 1.0 else z / t, dim=-1, out=work("lq", n, z.dtype))
    phi = psi = p = None
    if ts:
        lp, p = _teacher_log_probs(ts, t, work, n, z.dtype)
        if keep is not None:
            p.mul_(keep[:, None])
        psi = torch.vdot(p.view(-1), lp.sub_(lq).view(-1)) if kl else -torch.vdot(p.view(-1), lq.view(-1))
    ls = lq  # φ is at temperature 1
    if t != 1.0 and y is not None:
        ls = torch.log_softmax(z, dim=-1, out=work("ls", n, z.dtype))
    if y is not None:
        picked = ls.gather(1, y[:, None]).squeeze(1)
        phi = -(picked @ keep.to(picked.dtype) if keep is not None else picked.sum())
    if psi is None:
        psi = z.new_zeros(())
    if grad is None:
        return phi, psi, None
    c_phi, c_psi = grad
    g = out if out is not None and out.dtype == z.dtype else work("g", n, z.dtype)
    if p is None:  # φ alone
        torch.exp(ls, out=g).mul_(c_phi)
    else:
        torch.exp(lq, out=g)  # softmax(z/T)
        both = y is not None and t == 1.0  # one softmax serves φ and ψ
        g.mul_(c_phi + c_psi if both else c_psi)
        _sub_scaled(g, p, c_psi)
        if y is not None and not both:
            g.add_(ls.exp_().mul_(c_phi))
    if y is not None:
        g.scatter_add_(1, y[:, None], _full(-c_phi, g))
    if keep is not None:
        g.mul_(keep[:, None])
    if out is not None and g is not out:
        out.copy_(g)
    return phi, psi, g


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 at least (fp64 stays fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _teacher_log_probs(ts: list[torch.Tensor], t: float, work: _Work, n: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, p) of p the mean of the teachers' softmax(logits / T): one teacher's
    log-softmax, or the log of the averaged softmaxes (clamped at the smallest normal number,
    where a probability underflows to 0 and its term of ψ is 0 either way)."""
    lp, p = work("lp", n, dtype), work("p", n, dtype)
    if len(ts) == 1:
        tc = ts[0].to(dtype)
        torch.log_softmax(tc if t == 1.0 else tc / t, dim=-1, out=lp)
        return lp, torch.exp(lp, out=p)
    for k, tc in enumerate(ts):
        tc = tc.to(dtype)
        torch.softmax(tc if t == 1.0 else tc / t, dim=-1, out=p if k == 0 else lp)
        if k:
            p.add_(lp)
    p.div_(len(ts))
    return torch.clamp(p, min=torch.finfo(dtype).tiny, out=lp).log_(), p


def _sub_scaled(g: torch.Tensor, p: torch.Tensor, c: Scale) -> None:
    if isinstance(c, torch.Tensor):
        g.addcmul_(p, c, value=-1.0)
    else:
        g.sub_(p, alpha=c)


def _full(c: Scale, like: torch.Tensor) -> torch.Tensor:
    if isinstance(c, torch.Tensor):
        return c.to(like.dtype).expand(like.shape[0], 1).contiguous()
    return like.new_full((like.shape[0], 1), c)


def row_chunks(rows: int, width: int, elements: int) -> list[slice]:
    """Slices of ``rows`` rows of ``width`` elements, each at most ``elements`` (at least one row)."""
    step = max(1, elements // max(1, width))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


def _scales(n: int | torch.Tensor, weights: tuple[Scale, float], t: float, has_targets: bool
            ) -> tuple[Scale, Scale]:
    """(c_φ, c_ψ): d(w·φ + α·ψ)/dz = c_φ·(softmax(z) − onehot) + c_ψ·(softmax(z/T) − p), means over n rows."""
    w, alpha = weights
    return (w / n if has_targets else 0.0), alpha * t / n


def _count(keep: torch.Tensor | None, rows: int, like: torch.Tensor) -> int | torch.Tensor:
    """Rows counted: an int, or a 0-d tensor (at least 1, in fp32 or ``like``'s wider dtype)
    read without a host synchronisation."""
    return rows if keep is None else keep.sum().clamp_min(1).to(_wide(like).dtype)


def _finish(phi: torch.Tensor | None, psi: torch.Tensor, n: int | torch.Tensor, weights: tuple[Scale, float],
            t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    psi = psi * (t * t) / n
    phi = psi.new_zeros(()) if phi is None else phi / n
    return weights[0] * phi + weights[1] * psi, phi, psi


def _scaled(grad: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor | None:
    """The stored gradient times the incoming one; as it is when that is exactly 1 (a loss's own
    ``backward()``; read on the CPU only, where it costs nothing)."""
    if grad is None:
        return None
    if g.device.type == "cpu" and float(g) == 1.0:
        return grad
    return grad * g.to(grad.dtype)


# -- autograd ---------------------------------------------------------------------------
class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, y: torch.Tensor | None, keep: torch.Tensor | None, weights: tuple,
                kl: bool, t: float, ts: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = _count(keep, z.shape[0], z)
        want = ctx.needs_input_grad[0]
        scales = _scales(n, weights, t, y is not None) if want else None
        grad = torch.empty_like(z) if want else None
        phi = psi = None
        chunks = row_chunks(*z.shape, CHUNK_ELEMENTS)
        work = _Work.get(chunks[0].stop, z.shape[1], z.device)
        for rows in chunks:
            f, s, _ = _chunk(z[rows], [tc[rows] for tc in ts], None if y is None else y[rows],
                             None if keep is None else keep[rows], t, kl, scales, work,
                             None if grad is None else grad[rows])
            phi = f if phi is None else (phi if f is None else phi + f)
            psi = s if psi is None else psi + s
        ctx.grad = grad
        total, phi, psi = _finish(phi, psi, n, weights, t)
        ctx.mark_non_differentiable(phi, psi)
        return total, phi, psi

    @staticmethod
    def backward(ctx, g: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (_scaled(ctx.grad, g), None, None, None, None, None, None)


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor | None,
                keep: torch.Tensor | None, weights: tuple, kl: bool, t: float,
                ths: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = _count(keep, h.shape[0], h)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = b is not None and ctx.needs_input_grad[2]
        want = want_h or want_w or want_b
        scales = _scales(n, weights, t, y is not None) if want else None
        grad_h = torch.empty_like(h) if want_h else None
        acc = torch.promote_types(w.dtype, torch.float32)  # gradient sums in fp32 at least
        grad_w = torch.zeros_like(w, dtype=acc) if want_w else None
        grad_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if want_b else None
        phi = psi = None
        chunks = row_chunks(h.shape[0], w.shape[0], max(LINEAR_CHUNK_ELEMENTS, LINEAR_MIN_ROWS * w.shape[0]))
        work = _Work.get(chunks[0].stop, w.shape[0], h.device)
        for rows in chunks:
            hc, m = h[rows], rows.stop - rows.start
            z = _linear(hc, w, b, work("z", m, w.dtype))
            ts = [_linear(th[rows], tw, tb, work(f"t{j}", m, tw.dtype)) for j, (th, tw, tb) in enumerate(ths)]
            f, s, g = _chunk(z, ts, None if y is None else y[rows], None if keep is None else keep[rows],
                             t, kl, scales, work)
            phi = f if phi is None else (phi if f is None else phi + f)
            psi = s if psi is None else psi + s
            if g is None:
                continue
            if grad_h is not None:
                if g.dtype == w.dtype == h.dtype:
                    torch.mm(g, w, out=grad_h[rows])
                else:
                    grad_h[rows] = (g.to(w.dtype) @ w).to(h.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc.to(grad_w.dtype))
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(w.dtype),
                     None if grad_b is None else grad_b.to(b.dtype))
        total, phi, psi = _finish(phi, psi, n, weights, t)
        ctx.mark_non_differentiable(phi, psi)
        return total, phi, psi

    @staticmethod
    def backward(ctx, g: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gh, gw, gb = (_scaled(x, g) for x in ctx.grads)
        return (gh, gw, gb, None, None, None, None, None, None)


def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``h @ w.T + b`` into ``out``."""
    torch.mm(h.to(w.dtype), w.t(), out=out)
    return out if b is None else out.add_(b)


# -- inputs ------------------------------------------------------------------------------
def _rows_of(t: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{what} have shape {tuple(t.shape)} but the student's logits have shape "
                         f"{tuple(like.shape)}")
    return t.detach().reshape(-1, like.shape[-1])


def _targets_and_mask(targets: torch.Tensor | None, mask: torch.Tensor | None, shape: torch.Size
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Flat targets (rows not kept point at class 0) and the flat mask (None: every row)."""
    if mask is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit predictions of shape "
                         f"{tuple(shape)} + [classes]")
    keep = None if mask is None else mask.reshape(-1).bool()
    if targets is None:
        return None, keep
    if tuple(targets.shape) != tuple(shape):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not fit predictions of shape "
                         f"{tuple(shape)} + [classes] (they should be {tuple(shape)})")
    y = targets.reshape(-1).long()
    return (y if keep is None else y.where(keep, 0)), keep


def _weight_bias(head: nn.Linear | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, torch.Tensor):
        return head, None
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    raise TypeError(f"a head must be an nn.Linear or its weight tensor, got {type(head).__name__}")
