"""φ + α·ψ in one chunked pass (codistill.fused): the same values and gradients as the
unfused autograd forms, in float64 (where rounding is ~1e-16, so any wrong term shows)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from numerics import U32, kl_tolerance, softmax_sum_depth

from codistill import fused


def _reference(z, teacher_logits, y, keep, alpha, kl, t):
    """φ + α·ψ by autograd: cross entropy, and KL / soft CE toward the mean teacher softmax."""
    n = z.shape[0] if keep is None else keep.sum()
    w = torch.ones(z.shape[0], dtype=z.dtype) if keep is None else keep.to(z.dtype)
    phi = psi = torch.zeros((), dtype=z.dtype)
    if y is not None:
        phi = (F.cross_entropy(z, y.where(w > 0, 0), reduction="none") * w).sum() / n
    if teacher_logits:
        p = torch.stack([torch.softmax(tl / t, -1) for tl in teacher_logits]).mean(0)
        logq = torch.log_softmax(z / t, -1)
        rows = (p * (p.log() - logq)).sum(-1) if kl else -(p * logq).sum(-1)
        psi = (rows * w).sum() / n * t * t
    return phi + alpha * psi, phi, psi


CASES = [c for c in itertools.product([0, 1, 3], [True, False], [False, True], [1.0, 2.0], ["kl", "ce"])
         if c[0] > 0 or c[1]]


@pytest.mark.parametrize("teachers,targets,masked,t,kind", CASES)
@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_fused_loss_equals_the_autograd_form_in_float64(monkeypatch, teachers, targets, masked, t, kind,
                                                        chunk_rows):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk_rows * 7)
    g = torch.Generator().manual_seed(teachers * 100 + chunk_rows)
    z = (torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ts = [torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 3 for _ in range(teachers)]
    y = torch.randint(0, 7, (2, 5), generator=g)
    keep = torch.rand(2, 5, generator=g) > 0.3 if masked else None
    if masked:
        y = y.where(keep, -100)  # what the rows not counted hold does not matter
    out = fused.fused_loss(z, ts, y if targets else None, 0.7, kind, t, keep)
    (got,) = torch.autograd.grad(out.total * 1.3, z)  # an upstream gradient other than 1
    want = _reference(z.reshape(-1, 7), [x.reshape(-1, 7) for x in ts], y.reshape(-1) if targets else None,
                      None if keep is None else keep.reshape(-1), 0.7, kind == "kl", t)
    (expected,) = torch.autograd.grad(want[0] * 1.3, z)
    for a, b in zip((out.total, out.phi, out.psi), want, strict=True):
        assert abs(float(a.detach()) - float(b.detach())) < 1e-12
    assert float(out.psi) > 0 if teachers else float(out.psi) == 0.0
    assert torch.allclose(got, expected, rtol=0, atol=1e-13)
    assert not out.phi.requires_grad and not out.psi.requires_grad


@pytest.mark.parametrize("teachers,targets,masked,t", [(1, True, False, 1.0), (2, True, True, 2.0),
                                                       (1, False, True, 1.0), (0, True, False, 1.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_loss_equals_the_materialised_form_in_float64(monkeypatch, teachers, targets, masked, t,
                                                                   bias):
    monkeypatch.setattr(fused, "LINEAR_CHUNK_ELEMENTS", 3 * 11)  # chunks of 3 rows
    monkeypatch.setattr(fused, "LINEAR_MIN_ROWS", 1)
    torch.manual_seed(teachers)
    h = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(4, 11, bias=bias).double()
    peers = [(torch.randn(2, 5, 6, dtype=torch.float64), torch.nn.Linear(6, 11).double())
             for _ in range(teachers)]
    y = torch.randint(0, 11, (2, 5))
    keep = torch.rand(2, 5) > 0.3 if masked else None
    out = fused.fused_linear_loss(h, head, peers, y if targets else None, 0.5, "kl", t, keep)
    params = [h, head.weight] + ([head.bias] if bias else [])
    got = torch.autograd.grad(out.total, params)
    flat_keep = None if keep is None else keep.reshape(-1)
    want = _reference(head(h).reshape(-1, 11), [m(x).detach().reshape(-1, 11) for x, m in peers],
                      y.reshape(-1) if targets else None, flat_keep, 0.5, True, t)
    expected = torch.autograd.grad(want[0], params)
    assert abs(float(out.total) - float(want[0])) < 1e-12
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)


def test_fused_linear_loss_takes_a_weight_and_never_holds_a_rows_by_vocabulary_tensor(monkeypatch):
    """With chunks of 2 rows, no tensor the loss makes is larger than 2 rows × V (or the
    weight's gradient), however many rows: checked on every tensor allocated in the pass."""
    monkeypatch.setattr(fused, "LINEAR_CHUNK_ELEMENTS", 2 * 500)
    monkeypatch.setattr(fused, "LINEAR_MIN_ROWS", 1)
    h = torch.randn(64, 8, requires_grad=True)
    w = torch.randn(500, 8, requires_grad=True)
    peer = (torch.randn(64, 8), torch.randn(500, 8))
    largest = 0

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(o):
                    largest = max(largest, o.numel())
            return out

    with Watch():
        out = fused.fused_linear_loss(h, w, [peer], torch.randint(0, 500, (64,)))
        out.total.backward()
    assert largest <= 500 * 8  # the weight's gradient; logits of all rows would be 64 × 500
    assert h.grad.shape == h.shape and w.grad.shape == w.shape


def test_fused_loss_keeps_the_logits_dtype():
    z = torch.randn(4, 6, 50).to(torch.bfloat16).requires_grad_()
    out = fused.fused_loss(z, [torch.randn(4, 6, 50).to(torch.bfloat16)], torch.randint(0, 50, (4, 6)))
    out.total.backward()
    assert out.total.dtype == torch.float32 and z.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("v", [20, 1000, 32768])
def test_kl_from_teacher_logits_keeps_its_precision_when_the_peers_nearly_agree(v):
    """KL ≈ 1e-2 of two nearly equal distributions, from fp32 logits: within the bound of
    ``numerics.kl_tolerance`` (the student's side) plus the same normalizer shift for the
    teacher's log-softmax (Σ p = 1, so a shift of every log p moves the row by as much)."""
    g = torch.Generator().manual_seed(v)
    z = torch.randn(64, v, generator=g) * 3
    t = z + 0.2 * torch.randn(64, v, generator=g)
    p64, logq = torch.softmax(t.double(), -1), torch.log_softmax(z.double(), -1)
    ref = float(F.kl_div(logq, p64, reduction="batchmean"))
    tol = kl_tolerance(p64, logq) + 2 * softmax_sum_depth(v) * U32
    assert tol < ref / 3  # tight enough to tell the value from zero
    for y in (None, torch.zeros(64, dtype=torch.long)):
        assert abs(float(fused.fused_loss(z, [t], y).psi) - ref) <= tol


def test_bad_shapes_name_the_argument():
    z = torch.randn(3, 5)
    with pytest.raises(ValueError, match="teacher logits have shape"):
        fused.fused_loss(z, [torch.randn(3, 6)])
    with pytest.raises(ValueError, match="targets of shape"):
        fused.fused_loss(z, [], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask of shape"):
        fused.fused_loss(z, [z], mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="head predicts 7 classes"):
        fused.fused_linear_loss(torch.randn(3, 4), torch.randn(5, 4),
                                [(torch.randn(3, 4), torch.randn(7, 4))])


@pytest.mark.parametrize("weight", [0.25, torch.tensor(3.0, dtype=torch.float64)])
def test_phi_weight_scales_phi_alone(weight):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t, y = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randint(0, 9, (6,), generator=g)
    out = fused.fused_loss(z, [t], y, 0.5, phi_weight=weight)
    (got,) = torch.autograd.grad(out.total, z)
    _, phi, psi = _reference(z, [t], y, None, 0.5, True, 1.0)
    (want,) = torch.autograd.grad(float(weight) * phi + 0.5 * psi, z)
    assert abs(float(out.total.detach()) - float(weight) * float(phi) - 0.5 * float(psi)) < 1e-12
    assert torch.allclose(got, want, rtol=0, atol=1e-13)
