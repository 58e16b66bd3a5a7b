"""Weight averaging across replicas (local SGD, DiLoCo's outer Nesterov step)."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import U32
from safetensors.torch import load_file
from torch import nn

from codistill.averaging import OuterSync, outer_sync
from codistill.config import ConfigError, from_dict
from codistill.engine import run


def _linear(value: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def _set(m: nn.Module, value: float) -> None:
    with torch.no_grad():
        m.weight.fill_(value)


def test_local_sgd_replaces_weights_by_their_mean():
    models = [_linear(1.0), _linear(1.0), _linear(1.0)]
    syncs = [OuterSync(m) for m in models]
    for m, v in zip(models, (0.0, 3.0, 6.0)):
        _set(m, v)
    sent = outer_sync(syncs)
    assert sent == 4  # one float32
    assert [float(m.weight.detach()) for m in models] == [3.0, 3.0, 3.0]


def test_diloco_outer_step_is_nesterov_on_the_mean_pseudo_gradient():
    lr, mu = 0.7, 0.9
    models = [_linear(1.0), _linear(1.0)]
    syncs = [OuterSync(m, lr, mu) for m in models]
    anchor, v = 1.0, 0.0
    # Beside the float64 recurrence, a running error bound of the fp32 one: each operation rounds
    # by u·|result| (and by u·|product| more where lr or μ, rounded to fp32, multiplies) and
    # passes on its operands' errors; the weights set to the targets round too. Doubled.
    e_anchor = e_v = 0.0
    for targets in ((0.0, 0.4), (0.5, 0.1)):  # where the inner steps left the replicas
        for m, t in zip(models, targets):
            _set(m, t)
        delta = anchor - sum(targets) / 2
        e_delta = e_anchor + U32 * max(abs(t) + abs(anchor - t) for t in targets) + U32 * abs(delta)
        e_v = mu * e_v + 2 * U32 * abs(mu * v) + e_delta + U32 * abs(mu * v + delta)
        v = mu * v + delta
        nesterov = delta + mu * v
        e_nesterov = e_delta + mu * e_v + 2 * U32 * abs(mu * v) + U32 * abs(nesterov)
        anchor -= lr * nesterov
        e_anchor = e_anchor + lr * e_nesterov + 2 * U32 * abs(lr * nesterov) + U32 * abs(anchor)
        outer_sync(syncs)
        assert [float(m.weight.detach()) for m in models] == pytest.approx([anchor, anchor], abs=2 * e_anchor)
    state = syncs[0].state_dict()
    fresh = OuterSync(_linear(0.0), lr, mu)
    fresh.load_state_dict(state)
    assert float(fresh.anchor[0]) == pytest.approx(anchor, abs=2 * e_anchor)
    assert float(fresh.velocity[0]) == pytest.approx(v, abs=2 * e_v)


def test_outer_needs_several_replicas(tiny_config):
    with pytest.raises(ConfigError, match="outer.every"):
        from_dict({**tiny_config, "replicas": 1, "outer": {"every": 5}})


@pytest.mark.slow
@pytest.mark.parametrize("outer", [{"every": 5}, {"every": 5, "lr": 0.7, "momentum": 0.9}])
def test_engine_averages_replicas_and_resumes_exactly(tiny_config, tmp_path, outer):
    values = {**tiny_config, "outer": outer, "codistill": {**tiny_config["codistill"], "alpha": 0.0}}
    cfg = from_dict(values)
    full = run(cfg, str(tmp_path / "full"), progress=False)
    w = [load_file(str(tmp_path / "full" / f"replica-{r}" / "model.safetensors")) for r in (0, 1)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])  # step 30 is a sync step
    first = full["final"]["models"][0]["loss"]
    rows = [r for r in open(tmp_path / "full" / "metrics.jsonl") if '"kind": "train"' in r]
    assert '"bytes_averaged"' in rows[-1]
    parted = tmp_path / "parted"
    run(from_dict({**values, "checkpoint": {"every": 10}}), str(parted), progress=False, stop_at=10)
    run(from_dict({**values, "checkpoint": {"every": 10}}), str(parted), progress=False, resume=True)
    last = load_file(str(parted / "replica-0" / "model.safetensors"))
    assert all(torch.equal(w[0][k], last[k]) for k in last)
    assert first < 5.5  # it learned (uniform over 256 bytes is 5.55)


@pytest.mark.slow
def test_offline_distillation_from_a_finished_run(tiny_config, tmp_path):
    """Phase 1: two independent models; phase 2: a fresh model distilled from their ensemble."""
    values = {**tiny_config, "codistill": {**tiny_config["codistill"], "alpha": 0.0}}
    run(from_dict(values), str(tmp_path / "teachers"), progress=False)
    teachers = str(tmp_path / "teachers")
    student = {**tiny_config, "replicas": 1,
               "codistill": {**tiny_config["codistill"], "burn_in": 0, "teachers_from": teachers}}
    distilled = run(from_dict(student), str(tmp_path / "student"), progress=False)
    rows = [json.loads(r) for r in open(tmp_path / "student" / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["distill_loss"] > 0 for r in train)  # ψ from the first step on
    assert train[0]["teacher_versions"] == {"1": 30, "2": 30}
    alone = run(from_dict({**student, "codistill": {**student["codistill"], "alpha": 0.0}}),
                str(tmp_path / "alone"), progress=False)
    assert alone["final"]["models"][0]["loss"] != distilled["final"]["models"][0]["loss"]
    # Both learned: uniform over 256 bytes is 5.55; the teachers reach 3.3 in these 30 steps.
    assert max(alone["final"]["models"][0]["loss"], distilled["final"]["models"][0]["loss"]) < 4.0
    # The student closed on its teachers: ψ, its KL to their ensemble, falls from a random
    # init's (1.7 over steps 1-5) to 0.05 over steps 26-30; a student that did not train stays
    # near the first value.
    assert train[-1]["distill_loss"] < 0.2 * train[0]["distill_loss"]
    with pytest.raises(ConfigError, match="teachers_from"):
        from_dict({**student, "replicas": 2})
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        run(from_dict({**student, "codistill": {**student["codistill"], "teachers_from": str(tmp_path)}}),
            str(tmp_path / "bad"), progress=False)
    assert not (tmp_path / "bad").exists()
