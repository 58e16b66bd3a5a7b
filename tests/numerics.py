"""Tolerances for comparing fp32 results with float64 references, argued from the computation.

u is fp32's unit roundoff (2^-24). Each helper states the error bound it returns; the constant
factors are generous (2× to 4× the first-order bound) so that any CPU's summation order, SIMD
width or library passes, while a wrong formula (an error of the size of the value) fails.
Summation orders: any order (n − 1 additions per term) unless a helper names the torch kernel
whose blocked order it relies on (``torch_sum_depth``, ``softmax_sum_depth``).
"""

from __future__ import annotations

import torch

U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of fp32


def kl_tolerance(p: torch.Tensor, logq: torch.Tensor, temperature: float = 1.0) -> float:
    """Absolute error bound of an fp32 mean over rows of T²·Σ p·(log p − log q).

    Each term's error is about u·p·(|log p| + |log q|) (rounding of both logarithms, of their
    difference and of the product), so a row's sum is off by about u·(H(p) + CE(p, q)); the
    pairwise sum of the V small terms adds at most log2(V)·u·KL, which is far smaller. On top,
    log_softmax's normalizer Σ exp is off by at most ``softmax_sum_depth(V)``·u relative, which
    shifts every log q of the row by that much and so the row's value by as much (Σ p = 1),
    however small the KL. The mean over rows keeps the bound; T² scales it.
    """
    p64, logq64 = p.double(), logq.double()
    h = -torch.special.xlogy(p64, p64).sum(-1)
    ce = -(p64 * logq64).sum(-1)
    shift = softmax_sum_depth(p.shape[-1]) * U32
    return float((16 * U32 * (h + ce).mean() + 2 * shift) * temperature**2)


def torch_sum_depth(n: int) -> int:
    """How many additions a term goes through in torch's fp32 ``sum`` of n contiguous elements
    on CPU, on any SIMD width: ATen's cascade sum (aten/src/ATen/native/cpu/SumKernel.cpp,
    ``multi_row_sum``) adds chunks of L = max(16, 2^(⌈log2 n⌉/4)) elements over 4 levels (≤ 4L
    additions), over 4 interleaved accumulators and ≤ 16 SIMD lanes combined at the end, plus
    a tail of fewer than 16·4 elements added one by one; a thread split (the suite runs one
    thread) adds as many additions as threads. Bound: 4L + 4 + 16 + 64 + 32 (threads), and
    never more than n − 1 (any order)."""
    level = max(16, 1 << (max(1, n - 1).bit_length() // 4))
    return max(0, min(n - 1, 4 * level + 116))


def softmax_sum_depth(v: int) -> int:
    """How many additions an exponential goes through in the normalizer Σ_j exp(z_j − m) of
    torch's CPU softmax/log_softmax over V classes: ATen's kernels reduce with
    ``vec::map_reduce_all``, one accumulator per SIMD lane (at least 4 fp32 lanes on any build)
    added in turn over ⌈V/lanes⌉ steps, then the lanes combined (≤ 16). Bound: ⌈V/4⌉ + 16,
    and never more than V − 1 (any order)."""
    return max(0, min(v - 1, -(-v // 4) + 16))


def sum_tolerance(terms: torch.Tensor, term_error: torch.Tensor | float | None = None,
                  depth: int | None = None) -> float:
    """Absolute error bound of an fp32 sum of ``terms``.

    Each of the n − 1 additions rounds a partial sum of magnitude at most Σ|t|, so the sum is
    off by at most (n − 1)·u·Σ|t| whatever the order (Higham, *Accuracy and Stability of
    Numerical Algorithms*, §4.2): no assumption about a CPU's SIMD width, blocking or thread
    split. If each term goes through at most ``depth`` additions (a blocked or pairwise order,
    e.g. ``torch_sum_depth(n)`` for torch's own ``sum``), the bound is depth·u·Σ|t|. That part
    is doubled as a margin. ``term_error`` (a tensor like ``terms``, or one number for all) is
    each term's own error from the roundings that produced it, with its own margin; by default
    4u·|t| (one or two roundings, doubled). For a mean, divide by n (the division rounds once
    more, well inside the margin). Meant for the tests' small sums: a long sum in any order
    needs its own argument (``kl_tolerance``).
    """
    t = terms.detach().double().abs()
    own = 4 * U32 * t if term_error is None else torch.as_tensor(term_error, dtype=torch.float64).expand_as(t)
    depth = t.numel() - 1 if depth is None else depth
    return float(own.sum() + 2 * depth * U32 * t.sum())


def log_softmax_error(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-element bound of |fp32 log_softmax(z/T) − exact| over the last axis (V classes),
    for fp32 logits z (the reference must start from the same fp32 values).

    log q_i = (z_i − m) − log s with m = max z and s = Σ_j exp(z_j − m) ∈ [1, V]. The
    subtraction z_i − m rounds once (u·|z_i − m|); the exponentials (≤ 2u each) and their sum
    (D = ``softmax_sum_depth(V)`` additions) give s to (D + 2)·u relative, which log s turns
    into an absolute error, plus u·log s for rounding log s; the last subtraction adds
    u·|log q_i|. As |log q_i| = |z_i − m| + log s, the total is at most u·(3·|log q_i| + D + 2).
    Dividing by T ≠ 1 first rounds every z_j/T by u·|z_j/T|, which moves log q_i by at most
    2u·max|z/T|. Doubled as a margin.
    """
    s = logits.detach().double() / temperature
    err = U32 * (3 * torch.log_softmax(s, -1).abs() + softmax_sum_depth(s.shape[-1]) + 2)
    if temperature != 1.0:
        err = err + 2 * U32 * s.abs().amax(-1, keepdim=True)
    return 2 * err


def softmax_error(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-element bound of |fp32 softmax(z/T) − exact| over the last axis, for fp32 logits z.

    q_i = exp(z_i − m) / s: the subtraction rounds its argument (u·|z_i − m| relative after
    exp), exp rounds (2u), s is off by (D + 2)·u relative (see ``log_softmax_error``) and the
    division rounds (u): relative error u·(|z_i − m| + D + 5) ≤ u·(|log q_i| + D + 5), plus
    2u·max|z/T| for the division by T ≠ 1. Doubled as a margin.
    """
    s = logits.detach().double() / temperature
    logq = torch.log_softmax(s, -1)
    rel = U32 * (logq.abs() + softmax_sum_depth(s.shape[-1]) + 5)
    if temperature != 1.0:
        rel = rel + 2 * U32 * s.abs().amax(-1, keepdim=True)
    return 2 * rel * logq.exp()


def bce_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-element bound of |fp32 binary cross entropy with logits − exact|, for fp32 logits x
    and targets y in [0, 1].

    ℓ = (1 − y)·x + log(1 + exp(−x)) (computed with a max shift, or as −y·log σ − (1 − y)·
    log(1 − σ)): about six roundings (each relative u, ~2u for exp and log), each of a quantity
    at most |x| + ℓ + 1 in magnitude. Bound 8u·(|x| + ℓ + 1) per element, doubled as a margin.
    """
    x, y = logits.detach().double(), targets.detach().double()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
    return 16 * U32 * (x.abs() + loss + 1)


def sigmoid_error(logits: torch.Tensor) -> torch.Tensor:
    """Per-element bound of |fp32 sigmoid(x) − exact|: 1/(1 + exp(−x)) rounds exp (2u), the
    sum (u) and the reciprocal (u): 4u relative, doubled as a margin."""
    return 8 * U32 * torch.sigmoid(logits.detach().double())


def log_loss_error(p: torch.Tensor, targets: torch.Tensor, p_error: torch.Tensor) -> torch.Tensor:
    """Per-element bound of the error of fp32 ℓ = −(y·log p + (1 − y)·log(1 − p)), given a
    bound ``p_error`` of the fp32 probability's error (p is the exact, float64 one).

    An error ε in p moves log p by ε/p and log(1 − p) by ε/(1 − p), which is what makes ℓ
    ill-conditioned near 0 and 1; 1 − p rounds once (u), each logarithm rounds (u·|log|), the
    products and the sum round (2u·ℓ). Doubled as a margin.
    """
    p, y, eps = p.detach().double(), targets.detach().double(), torch.as_tensor(p_error, dtype=torch.float64)
    lp, l1p = p.log().abs(), (-p).log1p().abs()
    err = y * (eps / p + U32 * lp) + (1 - y) * ((eps + U32) / (1 - p) + U32 * l1p)
    return 2 * (err + 2 * U32 * (y * lp + (1 - y) * l1p))


def soft_target_tolerance(logits: torch.Tensor, p: torch.Tensor, temperature: float = 1.0,
                          kl: bool = True, p_error: torch.Tensor | None = None) -> float:
    """Absolute error bound of the fp32 ψ = T²·mean over rows of Σ_i p_i·(log p_i − log q_i)
    (``kl``) or −Σ_i p_i·log q_i, q = softmax(z/T), for fp32 logits z and fp32 targets p.

    Each term p_i·(log p_i − log q_i) is off by p_i·(error of log q_i, ``log_softmax_error``)
    + p_i·2u·(|log p_i| + 1) (the logarithm of p, for ``kl``) + 2u·|term| (the subtraction and
    the product); the rows × V terms are summed (``sum_tolerance``; ``kl``: torch's ``sum``,
    ``torch_sum_depth``; ``ce``: a BLAS dot product, in any order); the scaling by T²/N rounds
    twice more. Unlike ``kl_tolerance`` this bound grows with the number of terms: it is for the
    small ψ of the unit tests.

    ``p_error``: when the fp32 targets are themselves off from the reference's p by up to
    ``p_error`` (e.g. a teacher's fp32 softmax, ``softmax_error``), ψ moves at first order by
    Σ_i p_error_i·|∂ψ/∂p_i|, with ∂/∂p_i = log p_i − log q_i + 1 (``kl``) or −log q_i.
    """
    v = logits.shape[-1]
    z, p64 = logits.detach().double().reshape(-1, v), p.detach().double().reshape(-1, v)
    logq = torch.log_softmax(z / temperature, -1)
    err = p64 * log_softmax_error(z, temperature)
    if kl:
        logp = torch.where(p64 > 0, p64.log(), 0.0)
        terms = torch.special.xlogy(p64, p64) - p64 * logq
        err = err + p64 * 2 * U32 * (logp.abs() + 1)
    else:
        terms = -p64 * logq
    err = err + 2 * U32 * terms.abs()
    scale = temperature**2 / z.shape[0]
    value = float(terms.sum()) * scale
    moved = 0.0
    if p_error is not None:
        slope = (torch.where(p64 > 0, p64.log(), 0.0) - logq + 1) if kl else -logq
        moved = float((p_error.double().reshape(-1, v) * slope.abs()).sum()) * scale
    depth = torch_sum_depth(terms.numel()) if kl else None
    return sum_tolerance(terms, err, depth) * scale + 4 * U32 * abs(value) + moved


def soft_target_grad_error(logits: torch.Tensor, p: torch.Tensor, temperature: float = 1.0,
                           g_psi: float = 1.0, g_phi: float = 0.0,
                           targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element bound of the error of the fp32 gradient of g_ψ·ψ + g_φ·φ with respect to the
    logits: (T/N)·(g_ψ·(q·Σp − p)) for ψ at temperature T, and (1/N)·g_φ·(q − onehot(y)) for
    the task loss φ (fused: q·(g_φ + g_ψ·Σp) − g_ψ·p − g_φ·onehot(y), T = 1).

    q is off by ``softmax_error``; Σp over V terms by (V − 1)·u·Σp; the products, the
    subtractions and the scaling each round once, by u times a quantity at most
    |g_ψ·p| + g_φ + |gradient·N/T| + the q term. Doubled as a margin.
    """
    v = logits.shape[-1]
    z, p64 = logits.detach().double().reshape(-1, v), p.detach().double().reshape(-1, v)
    n, t = z.shape[0], temperature
    q = torch.softmax(z / t, -1)
    sp = p64.sum(-1, keepdim=True)
    a = g_phi + g_psi * sp
    onehot = torch.zeros_like(q)
    if targets is not None:
        onehot[torch.arange(n), targets.reshape(-1)] = 1.0
    grad = a * q - g_psi * p64 - g_phi * onehot
    err = (a * softmax_error(z, t) + 2 * abs(g_psi) * q * (v - 1) * U32 * sp
           + 8 * U32 * (a * q + abs(g_psi) * p64 + g_phi * onehot + grad.abs()))
    return (err * t / n).reshape(logits.shape)
