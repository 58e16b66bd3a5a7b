"""φ, ψ and the α schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import (
    U32,
    bce_error,
    kl_tolerance,
    log_softmax_error,
    soft_target_grad_error,
    soft_target_tolerance,
    sum_tolerance,
)

from codistill.codistiller import Codistiller, DistillLoss
from codistill.exchange import MemoryExchange
from codistill.losses import AlphaSchedule, distill_loss, predict_probs, task_loss
from codistill.teachers import average_predictions


def _logits(seed: int, shape=(2, 3, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_is_zero_when_student_equals_teacher(temperature):
    logits = _logits(0)
    p = predict_probs(logits, "kl", temperature)
    same = distill_loss(logits, p, "kl", temperature)
    # Exactly 0 for exact p: Σ p·(log p − log q) with p = softmax and log q = log_softmax of the
    # same logits is off by the roundings of its terms (kl_tolerance), and, at first order, by
    # Σ p·δ where δ ≤ (V + 4)·u·2 is how far the two fp32 softmaxes differ (softmax_error).
    logq = torch.log_softmax(logits.double() / temperature, -1)
    tol = kl_tolerance(p, logq, temperature) + 2 * (logits.shape[-1] + 4) * U32 * temperature**2
    assert abs(float(same)) <= tol
    other = distill_loss(logits, predict_probs(_logits(1), "kl", temperature), "kl", temperature)
    assert float(other) > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_and_soft_cross_entropy_have_the_same_gradient(temperature):
    t = temperature
    teacher = predict_probs(_logits(1), "kl", t)
    grads, losses = {}, {}
    for kind in ("kl", "ce"):
        student = _logits(0).requires_grad_(True)
        loss = distill_loss(student, teacher, kind, t)
        loss.backward()
        grads[kind], losses[kind] = student.grad, float(loss.detach())
    # The gradient is T·(q − p) per position, averaged over positions (with the T² scaling):
    # against float64 from the same fp32 inputs, within the bound argued for the fp32 one.
    z = _logits(0).double()
    q = torch.softmax(z / t, -1)
    positions = teacher.numel() // teacher.shape[-1]
    p64 = teacher.double()
    want = t * (q * p64.sum(-1, keepdim=True) - p64) / positions  # Σp = 1 up to fp32 rounding
    bound = soft_target_grad_error(z, teacher, t)
    for kind in ("kl", "ce"):
        assert bool(((grads[kind].double() - want).abs() <= bound).all()), kind
    # The two losses differ by T²·H(p): the teacher's entropy, which has no student gradient.
    # Each fp32 loss is within its bound of float64; H(p) is float64.
    entropy = float(-torch.special.xlogy(p64, p64).sum(-1).mean())
    tol = soft_target_tolerance(z, teacher, t, kl=True) + soft_target_tolerance(z, teacher, t, kl=False)
    assert abs(losses["ce"] - losses["kl"] - t * t * entropy) <= tol


def test_bce_distills_toward_averaged_probabilities():
    a, b, s = _logits(1, (6,)), _logits(2, (6,)), _logits(3, (6,))
    target = (torch.sigmoid(a) + torch.sigmoid(b)) / 2
    student = s.clone().requires_grad_(True)
    loss = distill_loss(student, target, "bce")
    # float64 from the same fp32 inputs; the fp32 mean of 6 terms is within sum_tolerance.
    q = torch.sigmoid(s.double())
    t64 = target.double()
    terms = -(t64 * q.log() + (1 - t64) * (1 - q).log())
    assert abs(float(loss.detach()) - float(terms.mean())) <= sum_tolerance(terms, bce_error(s, target)) / 6
    loss.backward()
    # (σ(s) − p)/6: σ rounds (≤ 2u·σ), the subtraction and the scaling round once each (u·|σ − p|);
    # doubled as a margin.
    atol = float(4 * U32 * (q + (q - t64).abs()).max() / 6)
    torch.testing.assert_close(student.grad.double(), (q - t64) / 6, rtol=0, atol=atol)
    # The minimum is at the averaged probability: zero gradient there. logit(p) is off by
    # ~3u·(1 + |logit p|)/(p(1 − p)) and σ' = p(1 − p) maps that back to ~3u·(1 + |logit p|);
    # σ and the subtraction add 2u: the gradient (÷6) is at most ~(5 + 3·|logit p|)·u/6.
    at_target = torch.logit(target).requires_grad_(True)
    distill_loss(at_target, target, "bce").backward()
    bound = 2 * float((5 + 3 * at_target.detach().double().abs().max()) * U32 / 6)
    assert float(at_target.grad.abs().max()) <= bound


def test_bce_codistiller_target_is_mean_of_peer_sigmoids():
    ex = MemoryExchange()
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in range(3)]
    cds = [Codistiller(m, ex, replica=r, num_replicas=3, exchange_every=1, loss="bce")
           for r, m in enumerate(models)]
    for cd in cds:
        cd.publish(1)
    assert cds[0].refresh() == {1: 1, 2: 1}
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = (torch.sigmoid(models[1](x)) + torch.sigmoid(models[2](x))) / 2
    got = average_predictions(list(cds[0].teachers.values()), x, "bce")
    torch.testing.assert_close(got, want)
    logits = models[0](x)
    torch.testing.assert_close(cds[0].distill_loss(x, logits, 5),
                               F.binary_cross_entropy_with_logits(logits, want))


def test_teacher_parameters_get_no_gradient(make_lm, tokens):
    ex = MemoryExchange()
    student, peer = make_lm(0), make_lm(1)
    cd = Codistiller(student, ex, replica=0, num_replicas=2, exchange_every=1)
    Codistiller(peer, ex, replica=1, num_replicas=2, exchange_every=1).publish(1)
    assert cd.refresh() == {1: 1}
    teacher = cd.teachers[1].module
    assert teacher is not peer and teacher is not student
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    target = average_predictions(list(cd.teachers.values()), tokens, "kl")
    assert not target.requires_grad
    logits = student(tokens)
    psi = cd.distill_loss(tokens, logits, 1)  # α = 1: the term is ψ itself
    assert psi.requires_grad and float(psi.detach()) > 0
    loss = task_loss(logits[:, :-1], tokens[:, 1:]) + psi
    loss.backward()

    assert not teacher.training
    for name, p in teacher.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad is False, name
    for name, p in student.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_distill_loss_alone_gives_student_gradient_only(make_lm, tokens):
    """ψ by itself (no task loss) still trains the student and never the teacher."""
    ex = MemoryExchange()
    student, peer = make_lm(0), make_lm(1)
    cd = Codistiller(student, ex, replica=0, num_replicas=2, exchange_every=1)
    Codistiller(peer, ex, replica=1, num_replicas=2, exchange_every=1).publish(1)
    assert cd.refresh() == {1: 1}
    cd.distill_loss(tokens, student(tokens), 3).backward()
    assert float(student.head.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in cd.teachers[1].module.parameters())


def test_alpha_schedule_burn_in():
    s = AlphaSchedule(alpha=0.5, burn_in=10)
    assert [s(i) for i in range(10)] == [0.0] * 10
    assert [s(i) for i in (10, 11, 50, 10_000)] == [0.5] * 4


def test_alpha_schedule_linear_ramp():
    s = AlphaSchedule(alpha=2.0, burn_in=10, ramp=4)
    assert s(9) == 0.0
    ramp = [s(i) for i in range(10, 14)]
    assert ramp == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert all(math.isclose(b - a, 0.5) for a, b in zip(ramp, ramp[1:]))
    assert s(14) == s(1000) == 2.0
    no_burn_in = AlphaSchedule(alpha=1.0, burn_in=0, ramp=2)
    assert [no_burn_in(i) for i in range(3)] == pytest.approx([0.5, 1.0, 1.0])


def test_alpha_zero_is_always_zero():
    s = AlphaSchedule(alpha=0.0, burn_in=0, ramp=3)
    assert {s(i) for i in range(20)} == {0.0}


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):
        distill_loss(_logits(0), torch.full((2, 3, 4), 0.25), "kl")


def test_unknown_kinds_raise():
    with pytest.raises(ValueError, match="distill kind"):
        distill_loss(_logits(0), predict_probs(_logits(1), "kl"), "mse")
    with pytest.raises(ValueError, match="task kind"):
        task_loss(_logits(0), torch.zeros(2, 3, dtype=torch.long), "regression")


def test_task_loss_matches_reference():
    logits = _logits(0)
    targets = torch.tensor([[0, 1, 2], [3, 4, 0]])
    # float64 from the same fp32 logits; the fp32 mean of the 6 picked log-probabilities is off by
    # their own errors (log_softmax_error) and by their sum's (sum_tolerance).
    idx = targets[..., None]
    picked = -torch.log_softmax(logits.double(), -1).gather(-1, idx)
    tol = sum_tolerance(picked, log_softmax_error(logits).gather(-1, idx)) / picked.numel()
    assert abs(float(task_loss(logits, targets)) - float(picked.mean())) <= tol
    clicks = torch.tensor([1.0, 0.0, 1.0])
    z = torch.tensor([0.3, -1.2, 2.0])
    q = torch.sigmoid(z.double())
    terms = -(clicks * q.log() + (1 - clicks) * (1 - q).log())
    tol = sum_tolerance(terms, bce_error(z, clicks)) / 3
    assert abs(float(task_loss(z, clicks, "binary")) - float(terms.mean())) <= tol


def test_codistiller_scales_psi_by_alpha_and_is_zero_in_burn_in(make_lm, tokens):
    ex = MemoryExchange()
    student, peer = make_lm(0), make_lm(1)
    cd = Codistiller(student, ex, replica=0, num_replicas=2, exchange_every=1,
                     alpha=AlphaSchedule(0.25, burn_in=4), loss=DistillLoss(temperature=2.0))
    Codistiller(peer, ex, replica=1, num_replicas=2, exchange_every=1).publish(1)
    assert cd.refresh() == {1: 1}
    logits = student(tokens)
    assert cd.alpha(3) == 0.0 and cd.alpha(4) == 0.25
    zero = cd.distill_loss(tokens, logits, 3)
    assert float(zero.detach()) == 0.0 and not zero.requires_grad  # adds nothing in burn-in
    with torch.no_grad():
        psi = distill_loss(logits, predict_probs(peer(tokens), "kl", 2.0), "kl", 2.0)
    term = cd.distill_loss(tokens, logits, 4)
    assert float(term.detach()) == pytest.approx(0.25 * float(psi), rel=1e-5)
    assert float(term.detach()) / cd.alpha(4) == pytest.approx(float(psi), rel=1e-5)


def test_label_smoothing_mix_equals_smoothed_targets():
    from codistill.losses import uniform_loss

    torch.manual_seed(0)
    eps = 0.2
    logits, y = torch.randn(6, 5, 7), torch.randint(0, 7, (6, 5))
    mixed = (1 - eps) * task_loss(logits, y) + eps * uniform_loss(logits)
    # float64 reference from the same fp32 logits. φ is a mean of 30 picked log-probabilities,
    # uniform_loss a mean of all 210; each within its sum_tolerance (the mix rounds 3 more times).
    lp, err = torch.log_softmax(logits.double(), -1), log_softmax_error(logits)
    ref = F.cross_entropy(logits.double().reshape(-1, 7), y.reshape(-1), label_smoothing=eps)
    idx = y[..., None]
    tol = ((1 - eps) * sum_tolerance(lp.gather(-1, idx), err.gather(-1, idx)) / 30
           + eps * sum_tolerance(lp, err) / 210 + 6 * U32 * float(ref))
    assert abs(float(mixed) - float(ref)) <= tol
    z, c = torch.randn(32), torch.randint(0, 2, (32,)).float()
    mixed = (1 - eps) * task_loss(z, c, "binary") + eps * uniform_loss(z, "binary")
    ref = F.binary_cross_entropy_with_logits(z.double(), c.double() * (1 - eps) + eps / 2)

    def bce_tol(target: torch.Tensor) -> float:  # an fp32 BCE mean toward target: sum_tolerance
        terms = F.binary_cross_entropy_with_logits(z.double(), target.double(), reduction="none")
        return sum_tolerance(terms, bce_error(z, target)) / 32

    tol = (1 - eps) * bce_tol(c) + eps * bce_tol(torch.full_like(z, 0.5)) + 6 * U32 * float(ref)
    assert abs(float(mixed) - float(ref)) <= tol


def _reference_psi(logits, p, kind, t):
    """ψ as it was computed before the fused form: autograd through log_softmax and kl_div."""
    logq = torch.log_softmax(logits.reshape(-1, logits.shape[-1]) / t, dim=-1)
    p = p.reshape(-1, p.shape[-1])
    loss = F.kl_div(logq, p, reduction="batchmean") if kind == "kl" else -(p * logq).sum(-1).mean()
    return loss * t * t


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("t", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1 << 20, 7])  # one chunk, and chunks of a single row
def test_fused_psi_equals_the_autograd_form_in_value_and_gradient(monkeypatch, kind, t, chunk):
    import codistill.fused as fused

    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    # float64 inputs that fp32 holds exactly: ψ computes in fp32, the reference in float64.
    logits = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 3).float().double().requires_grad_()
    p = torch.softmax(torch.randn(3, 5, 7, generator=g, dtype=torch.float64), -1).float().double()
    p[0, 0] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)  # zeros in the target
    ref = _reference_psi(logits, p, kind, t)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    got = distill_loss(logits, p, kind, t)
    (got_grad,) = torch.autograd.grad(got * 1.7, logits)  # an upstream gradient other than 1
    tol = soft_target_tolerance(logits, p, t, kl=kind == "kl")
    assert abs(float(got.detach()) - float(ref.detach())) <= tol
    bound = soft_target_grad_error(logits, p, t, g_psi=1.7) + 2 * U32 * ref_grad.abs() * 1.7  # ×1.7 rounds
    assert bool(((got_grad - ref_grad * 1.7).abs() <= bound).all())
    assert got_grad.dtype == logits.dtype


def test_fused_psi_keeps_the_logits_dtype_and_computes_in_fp32():
    logits = torch.randn(4, 6, 50).to(torch.bfloat16).requires_grad_()
    p = torch.softmax(torch.randn(4, 6, 50), -1)
    loss = distill_loss(logits, p)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    # fp32 from the bf16 logits (exact in fp32): within soft_target_tolerance of float64.
    ref = _reference_psi(logits.detach().double(), p.double(), "kl", 1.0)
    assert abs(float(loss.detach()) - float(ref)) <= soft_target_tolerance(logits, p)


@pytest.mark.parametrize("v", [20, 1000, 32768])
def test_kl_value_keeps_its_precision_when_the_peers_nearly_agree(v):
    """KL ≈ 5e-3 of two nearly equal distributions: the fp32 value of ψ toward probabilities
    is within the bound argued in ``numerics.kl_tolerance`` of a float64 reference, and far
    from zero or negative."""
    g = torch.Generator().manual_seed(v)
    z = torch.randn(64, v, generator=g) * 3
    p = torch.softmax(z + 0.1 * torch.randn(64, v, generator=g), -1)
    logq = torch.log_softmax(z.double(), -1)
    ref = float(F.kl_div(logq, p.double(), reduction="batchmean"))
    tol = kl_tolerance(p, logq)
    assert tol < ref / 3  # the bound is tight enough to tell the value from zero
    assert abs(float(distill_loss(z, p, "kl")) - ref) <= tol
