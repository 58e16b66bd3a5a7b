"""The plug-in fits real models: outputs of any shape, stated output kinds, recurrent models
with state, the environment as the launcher sets it, and the Codistiller counting steps."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from numerics import U32, kl_tolerance, log_softmax_error, softmax_error
from torch import nn

from codistill import Codistiller, DistillLoss, MemoryExchange, TeacherSpec
from codistill.losses import distill_loss
from codistill.modules import as_logits, prediction

ROOT = Path(__file__).resolve().parents[1]


class Wrapped(nn.Module):
    """A linear classifier whose output is wrapped as ``kind`` says."""

    def __init__(self, kind: str, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        z = self.lin(x)
        if self.kind == "tuple":
            return z, "state"
        if self.kind == "dict":
            return {"loss": z.sum(), "logits": z}
        if self.kind == "object":
            return SimpleNamespace(loss=None, logits=z)
        return z


def _pair(kind: str, **kw) -> tuple[list[Codistiller], list[nn.Module]]:
    ex = MemoryExchange()
    models = [Wrapped(kind, seed) for seed in (0, 1)]
    cds = [Codistiller(m, ex, replica=r, num_replicas=2, exchange_every=1, **kw)
           for r, m in enumerate(models)]
    for cd in cds:
        cd.publish(1)
    for cd in cds:
        cd.refresh(1)
    return cds, models


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "object"])
def test_teacher_calls_find_the_prediction_in_any_output(kind: str) -> None:
    cds, models = _pair(kind)
    x = torch.randn(5, 4)
    got = cds[0].distill_loss(x, models[0](x), step=1)
    z0, z1 = models[0].lin(x), models[1].lin(x)
    want = distill_loss(z0, torch.softmax(z1, -1), "kl")
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert float(got.detach()) > 0


def test_prediction_and_output_kinds() -> None:
    z = torch.randn(6, 5)
    assert prediction((z, None)) is z and prediction({"x": z}) is z and prediction([{"logits": z}]) is z
    with pytest.raises(TypeError, match="TeacherSpec"):
        prediction(SimpleNamespace(hidden=z))
    # log-probabilities and probabilities give the softmax of the logits they came from, against
    # float64: the fp32 log-probabilities are off by e ≤ log_softmax_error (for probabilities,
    # log of an fp32 softmax: softmax_error/q + 2u·|log q|); softmax is shift-invariant, so they
    # move q by at most 2·max|e| relative; the softmax of them rounds by softmax_error.
    q = torch.softmax(z.double(), -1)
    e_log = log_softmax_error(z)
    e_probs = softmax_error(z) / q + 2 * U32 * q.log().abs()
    for outputs, pred, e in (("log_probs", torch.log_softmax(z, -1), e_log),
                             ("probs", torch.softmax(z, -1), e_probs)):
        logits = as_logits(pred, outputs, "kl")
        bound = q * 2 * e.amax(-1, keepdim=True) + softmax_error(logits)
        assert bool(((torch.softmax(logits, -1).double() - q).abs() <= bound).all()), outputs
    # For clicks, logit = log p − log(1 − p) from fp32 log σ(b) or σ(b) (off by ≤ 4u·(|log p| + 1)
    # or 4u relative): an error ε in log p is one of ε/(1 − p) in the logit, and the logarithms and
    # the subtraction round once each. Bound 4u·(|log p| + 2)/(1 − p) + u·(|log p| + |log(1 − p)| + |b|),
    # doubled.
    b = torch.randn(8)
    p = torch.sigmoid(b.double())
    bound = 2 * U32 * (4 * (p.log().abs() + 2) / (1 - p) + p.log().abs() + (-p).log1p().abs() + b.abs())
    for outputs, pred in (("log_probs", torch.nn.functional.logsigmoid(b)), ("probs", torch.sigmoid(b))):
        assert bool(((as_logits(pred, outputs, "bce").double() - b.double()).abs() <= bound).all()), outputs
    with pytest.raises(ValueError, match="outputs"):
        Codistiller(nn.Linear(2, 2), MemoryExchange(), loss=DistillLoss(predictions="scores"))


class StatefulRNN(nn.Module):
    """forward(x, hidden) -> (log_probs, hidden), as public word-LM scripts write it."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)
        self.rnn = nn.LSTM(8, 8, batch_first=True)

    def init_hidden(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, batch, 8), torch.zeros(1, batch, 8)

    def forward(self, x, hidden):  # noqa: ANN001, ANN201
        out, hidden = self.rnn(self.embed(x), hidden)
        return torch.log_softmax(self.head(out), -1), hidden


def test_a_recurrent_model_with_state_and_log_probs() -> None:
    ex = MemoryExchange()
    models = [StatefulRNN(s) for s in (0, 1)]
    fwd = lambda m, x: m(x, m.init_hidden(len(x)))  # noqa: E731
    cds = [Codistiller(m, ex, replica=r, num_replicas=2, exchange_every=2,
                       loss=DistillLoss(predictions="log_probs"), teachers=TeacherSpec(forward=fwd))
           for r, m in enumerate(models)]
    opts = [torch.optim.Adam(m.parameters(), 1e-2) for m in models]
    x = torch.randint(0, 11, (4, 6))
    losses: list[list[float]] = [[], []]
    for _ in range(6):
        for r, (m, cd, opt) in enumerate(zip(models, cds, opts)):
            log_probs, _ = m(x, m.init_hidden(4))
            term = cd.distill_loss(x, log_probs)  # at the step the Codistiller counted
            if term.requires_grad:
                term.backward()
            opt.step()
            opt.zero_grad()
            losses[r].append(float(term.detach()))
        for cd in cds:  # replica 0 refreshes before replica 1 publishes: it sees the previous version
            cd.after_step()
    assert [cd.step for cd in cds] == [6, 6]
    assert (cds[0].teacher_versions(), cds[1].teacher_versions()) == ({1: 4}, {0: 6})
    cds[0].refresh()
    with torch.no_grad():  # ψ is the KL between the two models' next-token distributions
        lp0, lp1 = models[0](x, models[0].init_hidden(4))[0], models[1](x, models[1].init_hidden(4))[0]
        got = float(cds[0].distill_loss(x, lp0))
    # float64 from the same fp32 log-probabilities (the teacher's forward is the same computation):
    # ψ's fp32 sum is within kl_tolerance, and its target, the fp32 softmax of the teacher's log-
    # probabilities, is off by softmax_error, which moves KL by Σ δp·|log p − log q + 1| (first order).
    p, logq = torch.softmax(lp1.double(), -1), torch.log_softmax(lp0.double(), -1)
    want = float((p * (p.log() - logq)).sum(-1).mean())
    moved = float((softmax_error(lp1) * (p.log() - logq + 1).abs()).sum(-1).mean())
    assert abs(got - want) <= kl_tolerance(p.reshape(-1, 11), logq.reshape(-1, 11)) + moved
    # ψ is 0 until a teacher is loaded: replica 1 from step 2 on, replica 0 from step 4 on
    assert losses[1][:2] == [0.0] * 2 and all(v > 0 for v in losses[1][2:])
    assert losses[0][:4] == [0.0] * 4 and all(v > 0 for v in losses[0][4:])
    with pytest.raises(TypeError, match="step must be an int"):
        cds[0].refresh({"step": 1})  # type: ignore[arg-type]


def test_from_env_reads_the_launchers_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("CODISTILL_REPLICA", "CODISTILL_NUM_REPLICAS", "CODISTILL_EXCHANGE"):
        monkeypatch.delenv(k, raising=False)
    alone = Codistiller.from_env(nn.Linear(2, 2))
    assert (alone.replica, alone.num_replicas, alone.peers, alone.alpha(10)) == (0, 1, [], 0.0)
    monkeypatch.setenv("CODISTILL_REPLICA", "1")
    monkeypatch.setenv("CODISTILL_NUM_REPLICAS", "3")
    with pytest.raises(ValueError, match="CODISTILL_EXCHANGE"):
        Codistiller.from_env(nn.Linear(2, 2))
    monkeypatch.setenv("CODISTILL_EXCHANGE", str(tmp_path / "ex"))
    cd = Codistiller.from_env(nn.Linear(2, 2), exchange_every=5)
    assert (cd.replica, cd.num_replicas, cd.peers, cd.exchange_every) == (1, 3, [0, 2], 5)
    cd.after_step(5)  # publishes through the background writer; close waits for it
    cd.close()
    assert (tmp_path / "ex" / "replica-1" / f"{5:010d}.json").exists()


@pytest.mark.slow
def test_the_word_lm_example_codistills_under_the_launcher(tmp_path: Path) -> None:
    """examples/word_lm.py: a plain script plus six lines, 2 replicas through codistill launch."""
    job = subprocess.run(
        [sys.executable, "-m", "codistill", "launch", "--replicas", "2", "--exchange", str(tmp_path / "ex"),
         "--", sys.executable, str(ROOT / "examples" / "word_lm.py"), "--steps", "100", "--vocab", "500",
         "--burn-in", "25"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    psis = []
    for r in (0, 1):
        lines = [ln for ln in job.stdout.splitlines() if ln.startswith(f"[replica {r}]") and "step 100" in ln]
        assert lines and f"{{{1 - r}: " in lines[0], job.stdout[-2000:]  # a teacher was loaded
        loss = float(lines[0].split("loss ")[1].split()[0])
        # An untrained model's φ alone is about log 500 = 6.2 (ψ adds to it); 100 steps reach
        # 3.6-3.8 on this one batch: a nat and a half below is a model that learned.
        assert math.isfinite(loss) and loss < math.log(500) - 1.5
        # ψ of step 99: None for a replica whose first teacher came at the step-100 exchange (its
        # peer lagged behind); the slower replica finds the faster one's versions at an earlier one.
        psi = lines[0].split("psi ")[1].split()[0]
        if psi != "None":
            psis.append(float(psi))
            assert 0 < psis[-1] < loss  # the replicas differ: seeded apart, data apart
    assert psis, job.stdout[-2000:]
