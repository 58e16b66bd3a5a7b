"""φ, ψ and the α schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import kl_tolerance

from codistill.codistiller import Codistiller, DistillLoss
from codistill.exchange import MemoryExchange
from codistill.losses import AlphaSchedule, distill_loss, predict_probs, task_and_distill_loss, task_loss
from codistill.teachers import average_predictions


def _logits(seed: int, shape=(2, 3, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_is_zero_when_student_equals_teacher(temperature):
    logits = _logits(0)
    same = distill_loss(logits, predict_probs(logits, "kl", temperature), "kl", temperature)
    assert abs(float(same)) < 1e-6
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
    torch.testing.assert_close(grads["kl"], grads["ce"], atol=1e-6, rtol=1e-5)
    # The gradient is T·(q − p) per position, averaged over positions (with the T² scaling).
    q = predict_probs(_logits(0), "kl", t)
    positions = teacher.numel() // teacher.shape[-1]
    torch.testing.assert_close(grads["kl"], t * (q - teacher) / positions, atol=1e-6, rtol=1e-5)
    # The two losses differ by T²·H(p): the teacher's entropy, which has no student gradient.
    entropy = float(-(teacher * teacher.log()).sum(-1).mean())
    assert losses["ce"] - losses["kl"] == pytest.approx(t * t * entropy, rel=1e-5)


def test_bce_distills_toward_averaged_probabilities():
    a, b, s = _logits(1, (6,)), _logits(2, (6,)), _logits(3, (6,))
    target = (torch.sigmoid(a) + torch.sigmoid(b)) / 2
    student = s.clone().requires_grad_(True)
    loss = distill_loss(student, target, "bce")
    q = torch.sigmoid(s)
    by_hand = -(target * q.log() + (1 - target) * (1 - q).log()).mean()
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(student.grad, (q - target) / 6)
    # The minimum is at the averaged probability: zero gradient there.
    at_target = torch.logit(target).requires_grad_(True)
    distill_loss(at_target, target, "bce").backward()
    assert at_target.grad.abs().max() < 1e-6


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
    want = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    assert float(task_loss(logits, targets)) == pytest.approx(float(want), rel=1e-6)
    clicks = torch.tensor([1.0, 0.0, 1.0])
    z = torch.tensor([0.3, -1.2, 2.0])
    want_bin = -(clicks * torch.sigmoid(z).log() + (1 - clicks) * (1 - torch.sigmoid(z)).log()).mean()
    assert float(task_loss(z, clicks, "binary")) == pytest.approx(float(want_bin), rel=1e-6)


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
    ref = F.cross_entropy(logits.reshape(-1, 7), y.reshape(-1), label_smoothing=eps)
    assert torch.allclose(mixed, ref, atol=1e-6)
    z, c = torch.randn(32), torch.randint(0, 2, (32,)).float()
    mixed = (1 - eps) * task_loss(z, c, "binary") + eps * uniform_loss(z, "binary")
    ref = F.binary_cross_entropy_with_logits(z, c * (1 - eps) + eps / 2)
    assert torch.allclose(mixed, ref, atol=1e-6)


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
    import codistill.losses as losses

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    p = torch.softmax(torch.randn(3, 5, 7, generator=g, dtype=torch.float64), -1)
    p[0, 0] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)  # zeros in the target
    ref = _reference_psi(logits, p, kind, t)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    got = distill_loss(logits, p, kind, t)
    (got_grad,) = torch.autograd.grad(got * 1.7, logits)  # an upstream gradient other than 1
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad.double(), ref_grad * 1.7, rtol=1e-5, atol=1e-7)
    assert got_grad.dtype == logits.dtype


def test_fused_psi_keeps_the_logits_dtype_and_computes_in_fp32():
    logits = torch.randn(4, 6, 50).to(torch.bfloat16).requires_grad_()
    p = torch.softmax(torch.randn(4, 6, 50), -1)
    loss = distill_loss(logits, p)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref = _reference_psi(logits.detach().float(), p, "kl", 1.0)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_fused_task_and_distill_loss_equals_the_two_losses(monkeypatch, kind, chunk):
    import codistill.losses as losses

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, 7, (3, 5), generator=g)
    p = torch.softmax(torch.randn(3, 5, 7, generator=g, dtype=torch.float64), -1)
    alpha = 0.7
    phi_ref, psi_ref = task_loss(logits, y), _reference_psi(logits, p, kind, 1.0)
    (grad_ref,) = torch.autograd.grad(phi_ref + alpha * psi_ref, logits)
    phi, psi = losses.task_and_distill_loss(logits, y, p, kind)
    (grad,) = torch.autograd.grad(phi + alpha * psi, logits)
    torch.testing.assert_close(phi.double(), phi_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(psi.double(), psi_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("v", [20, 1000, 32768])
def test_kl_value_keeps_its_precision_when_the_peers_nearly_agree(v):
    """KL ≈ 5e-5 of two nearly equal distributions: the fp32 value (ψ alone and fused with φ)
    is within the bound argued in ``numerics.kl_tolerance`` of a float64 reference, and far
    from zero or negative."""
    g = torch.Generator().manual_seed(v)
    z = torch.randn(64, v, generator=g) * 3
    p = torch.softmax(z + 0.01 * torch.randn(64, v, generator=g), -1)
    logq = torch.log_softmax(z.double(), -1)
    ref = float(F.kl_div(logq, p.double(), reduction="batchmean"))
    tol = kl_tolerance(p, logq)
    assert tol < ref / 3  # the bound is tight enough to tell the value from zero
    _, psi = task_and_distill_loss(z, torch.zeros(64, dtype=torch.long), p, "kl")
    for got in (distill_loss(z, p, "kl"), psi):
        assert abs(float(got) - ref) <= tol
