"""Tolerances for comparing fp32 results with float64 references, argued from the computation.

u is fp32's unit roundoff (2^-24). Each helper states the error bound it returns; the constant
factors are generous (about 4× the first-order bound) so that any CPU's summation order, SIMD
width or library passes, while a wrong formula (an error of the size of the value) fails.
"""

from __future__ import annotations

import torch

U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of fp32


def kl_tolerance(p: torch.Tensor, logq: torch.Tensor, temperature: float = 1.0) -> float:
    """Absolute error bound of an fp32 mean over rows of T²·Σ p·(log p − log q).

    Each term's error is about u·p·(|log p| + |log q|) (rounding of both logarithms, of their
    difference and of the product), so a row's sum is off by about u·(H(p) + CE(p, q)); the
    pairwise sum of the V small terms adds at most log2(V)·u·KL, which is far smaller. The mean
    over rows keeps the bound; T² scales it.
    """
    p64, logq64 = p.double(), logq.double()
    h = -torch.special.xlogy(p64, p64).sum(-1)
    ce = -(p64 * logq64).sum(-1)
    return float(16 * U32 * (h + ce).mean() * temperature**2)
