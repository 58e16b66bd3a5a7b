"""What a new user's script meets first: a wrong teacher forward found at step one even
alone, teachers carrying an RNN's state, ψ and α visible, per-replica seeds, token streams
sharded in order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codistill import (
    Codistiller,
    DistillLoss,
    MemoryExchange,
    TeacherSpec,
    replica_seed,
    shard_dataset,
    task_loss,
)
from codistill.data.sharding import replica_indices


class SeqFirstLM(nn.Module):
    """The PyTorch word-LM example's shape: input [T, B], hidden [layers, B, H], seq-first."""

    def __init__(self, seed: int, vocab: int = 13, hidden: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, 8)
        self.rnn = nn.LSTM(8, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)
        self.hidden = hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, bsz, self.hidden), torch.zeros(1, bsz, self.hidden)

    def forward(self, x: torch.Tensor, h: tuple[torch.Tensor, torch.Tensor]):  # noqa: ANN201
        out, h = self.rnn(self.drop(self.embed(x)), h)
        return self.head(self.drop(out)), h


def _alone(model: nn.Module, **kw) -> Codistiller:
    return Codistiller(model, MemoryExchange(), replica=0, num_replicas=1, **kw)


def test_a_batch_first_teacher_forward_on_a_seq_first_model_fails_at_the_first_step_alone():
    model = SeqFirstLM(0)
    x = torch.randint(0, 13, (7, 3))  # 7 steps of 3 sequences
    out, _ = model(x, model.init_hidden(3))
    wrong = _alone(model, teachers=TeacherSpec(forward=lambda m, x: m(x, m.init_hidden(len(x)))))
    with pytest.raises(ValueError, match=r"TeacherSpec\.forward .* fails on the student's own model.*hidden"):
        wrong.distill_loss(x, out)
    transposed = _alone(model, teachers=TeacherSpec(forward=lambda m, x: m(x.t().contiguous(),
                                                                            m.init_hidden(x.size(0)))))
    shapes = r"shape \(3, 7, 13\) on the student's own model.*shape \(7, 3, 13\)"
    with pytest.raises(ValueError, match=shapes):
        transposed.distill_loss(x, out)
    right = _alone(model, teachers=TeacherSpec(forward=lambda m, x: m(x, m.init_hidden(x.size(1)))))
    assert float(right.distill_loss(x, out)) == 0.0  # alone: no peer, ψ is 0, and no error


def test_the_check_leaves_training_mode_random_state_and_batch_norm_alone():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    x = torch.randn(16, 4)
    out = model(x)
    stats = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    cd = _alone(model)
    torch.manual_seed(123)
    cd.distill_loss(x, out)
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(4))  # the check drew no random numbers from the script's stream
    assert model.training and torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].num_batches_tracked, stats[1])


def test_a_stateful_teacher_forward_carries_the_state_and_resets_it_on_a_new_version():
    ex = MemoryExchange()
    models = [SeqFirstLM(s) for s in (0, 1)]

    def fwd(m, x, h):  # noqa: ANN001, ANN202
        return m(x, h if h is not None else m.init_hidden(x.size(1)))

    cds = [Codistiller(m, ex, replica=r, num_replicas=2, exchange_every=1,
                       teachers=TeacherSpec(forward=fwd, stateful=True)) for r, m in enumerate(models)]
    for cd in cds:
        cd.publish(1)
    cds[0].refresh(1)
    chunks = torch.randint(0, 13, (2, 5, 3))  # two consecutive chunks of one stream
    teacher = cds[0].teachers[1]
    want_h = models[1].init_hidden(3)
    with torch.no_grad():
        for chunk in chunks:
            student, _ = models[0](chunk, models[0].init_hidden(3))
            got = cds[0].distill_loss(chunk, student, step=1)
            logits, want_h = models[1](chunk, want_h)  # the peer's model, its state carried
            p, logq = torch.softmax(logits, -1), torch.log_softmax(student, -1)
            want = (p * (p.log() - logq)).sum(-1).mean()
            # same fp32 computation as ψ's, up to summation order: relative error of a few ulp
            assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert teacher.state is not None and torch.allclose(teacher.state[0], want_h[0])
    cds[1].publish(2)
    cds[0].refresh(2)
    assert teacher.version == 2 and teacher.state is None


def test_stats_show_psi_and_alpha_and_a_writer_gets_them_at_every_exchange(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    ex = MemoryExchange()
    writer = SummaryWriter(str(tmp_path / "tb"))
    models = [nn.Linear(4, 3) for _ in range(2)]
    cds = [Codistiller(m, ex, replica=r, num_replicas=2, exchange_every=2, alpha=0.5,
                       writer=writer if r == 1 else None) for r, m in enumerate(models)]
    x = torch.randn(8, 4)
    assert cds[0].stats().psi is None
    for step in range(4):
        for cd, m in zip(cds, models):
            term = cd.distill_loss(x, m(x))
            cd.after_step()
        if step == 1:
            assert float(term) == 0.0  # no teacher before the first exchange
    term = cds[0].distill_loss(x, models[0](x))
    s = cds[0].stats()
    assert s.alpha == 0.5 and s.psi is not None and s.psi > 0
    assert float(term.detach()) == pytest.approx(0.5 * s.psi, rel=1e-6)
    # replica 0 refreshes before replica 1 publishes: at step 2 nothing, at step 4 version 2
    assert s.teacher_versions == {1: 2} and s.staleness == {1: 2} and s.bytes_published > 0
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"codistill/psi", "codistill/alpha", "codistill/teacher_version/0", "codistill/staleness/0",
            "codistill/bytes_published"} <= set(tags)
    # replica 1 loads replica 0's versions 2 and 4 at its exchanges; ψ exists from step 2 on
    assert [e.step for e in events.Scalars("codistill/alpha")] == [2, 4]
    assert [(e.step, e.value) for e in events.Scalars("codistill/teacher_version/0")] == [(2, 2.0), (4, 4.0)]
    (psi,) = events.Scalars("codistill/psi")
    assert psi.step == 4 and psi.value > 0


def test_replica_seed_differs_per_replica_and_keeps_the_base_alone(monkeypatch):
    monkeypatch.delenv("CODISTILL_REPLICA", raising=False)
    assert replica_seed(42) == 42
    monkeypatch.setenv("CODISTILL_REPLICA", "2")
    monkeypatch.setenv("CODISTILL_NUM_REPLICAS", "3")
    assert replica_seed(42) == 42 + 2 * 1009 and replica_seed(42, replica=0) == 42


@pytest.mark.parametrize("n, replicas, workers", [(103, 2, 1), (103, 3, 2), (10, 2, 2)])
def test_contiguous_shards_are_disjoint_in_order_and_cover(n, replicas, workers):
    parts = [replica_indices(n, r, replicas, w, workers, contiguous=True, even=False)
             for r in range(replicas) for w in range(workers)]
    flat = [int(i) for p in parts for i in p]
    assert flat == list(range(n))  # in order, each index once, nothing left out
    even = [replica_indices(n, r, replicas, w, workers, contiguous=True) for r in range(replicas)
            for w in range(workers)]
    for r in range(replicas):  # equal worker sizes within a replica, at most workers-1 dropped
        sizes = {len(p) for p in even[r * workers:(r + 1) * workers]}
        assert len(sizes) == 1
    assert len({int(i) for p in even for i in p}) >= n - replicas * (workers - 1)


def test_shard_dataset_cuts_a_token_stream_into_ordered_views(monkeypatch):
    monkeypatch.setenv("CODISTILL_REPLICA", "1")
    monkeypatch.setenv("CODISTILL_NUM_REPLICAS", "2")
    tokens = torch.arange(1000)
    part = shard_dataset(tokens, contiguous=True, num_workers=1, worker=0)
    assert torch.equal(part, torch.arange(500, 1000)) and part.data_ptr() == tokens[500:].data_ptr()
    scattered = shard_dataset(tokens, num_workers=1, worker=0)  # the default: a random half
    idx = torch.tensor(scattered.indices)
    assert len(idx) == 500 and not torch.equal(idx, torch.arange(500, 1000))


def _taught(loss: str = "kl", **kw) -> tuple[Codistiller, nn.Module, nn.Module]:
    ex = MemoryExchange()
    torch.manual_seed(0)
    student, peer = nn.Linear(4, 6), nn.Linear(4, 6)
    cd = Codistiller(student, ex, replica=0, num_replicas=2, exchange_every=1, loss=loss, **kw)
    Codistiller(peer, ex, replica=1, num_replicas=2).publish(1)
    cd.refresh(1)
    return cd, student, peer


def test_total_loss_is_the_fused_pass_of_phi_and_alpha_psi():
    from codistill.fused import fused_loss

    cd, student, _ = _taught(alpha=0.5)
    x, y = torch.randn(3, 5, 4), torch.randint(0, 6, (3, 5))
    out = student(x)
    got = cd.total_loss(x, out, y, step=1)
    _, teacher_logits = cd.distill_target(x, 1)
    total, phi, psi = fused_loss(out, teacher_logits, y, 0.5, "kl")
    assert torch.equal(got, total)  # the same computation, in the same order
    assert cd.stats().psi == float(psi) and cd.stats().alpha == 0.5
    (g_total,) = torch.autograd.grad(got, student.weight)
    (g_apart,) = torch.autograd.grad(task_loss(student(x), y) + cd.distill_loss(x, student(x), 1),
                                     student.weight)
    # one fused softmax against two: fp32 rounding apart, a few ulp of the gradient's scale
    assert torch.allclose(g_total, g_apart, rtol=1e-5, atol=1e-6 * float(g_apart.abs().max()))


def test_total_loss_leaves_ignored_positions_out_of_phi_and_psi():
    cd, student, _ = _taught()
    x, y = torch.randn(2, 5, 4), torch.randint(0, 6, (2, 5))
    y[0, 3:] = -100
    out = student(x)
    got = cd.total_loss(x, out, y, step=1)
    keep = y != -100
    phi = F.cross_entropy(out.reshape(-1, 6), y.reshape(-1), ignore_index=-100)
    # one fused pass against cross entropy + ψ apart: fp32 sums of ~10 terms of size ~1 taken in
    # other orders, off by ~10 ulp relative (u = 6e-8)
    torch.testing.assert_close(got, phi + cd.distill_loss(x, out, 1, mask=keep), rtol=1e-5, atol=0)
    y_all = y.clone()
    y_all[0, 3:] = 0  # the padded positions now count, and the value moves
    assert float(cd.total_loss(x, out, y_all, step=1)) != pytest.approx(float(got))


def test_total_loss_alone_binary_and_at_a_temperature():
    alone = _alone(nn.Linear(4, 6))
    x, y = torch.randn(8, 4), torch.randint(0, 6, (8,))
    out = alone.model(x)
    assert torch.equal(alone.total_loss(x, out, y), task_loss(out, y))
    cd, student, _ = _taught("bce")
    yb = torch.randint(0, 2, (8, 6)).float()
    out = student(x)
    assert torch.equal(cd.total_loss(x, out, yb, step=1),
                       task_loss(out, yb, "binary") + cd.distill_loss(x, out, 1))
    hot, student, _ = _taught(DistillLoss("kl", temperature=2.0))
    out = student(x)
    # one fused pass at T = 2 against φ + ψ apart: fp32 sums in other orders (rtol ~10 ulp)
    torch.testing.assert_close(hot.total_loss(x, out, y, step=1),
                               task_loss(out, y) + hot.distill_loss(x, out, 1), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"targets of shape \(7,\) do not fit"):
        hot.total_loss(x, out, y[:7], step=1)
