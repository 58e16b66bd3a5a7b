"""A run directory is never silently mixed with another run; resume truncates metrics."""

from __future__ import annotations

import json

import pytest
import torch

from codistill import Codistiller
from codistill.config import from_dict, load_config
from codistill.engine import run
from codistill.metrics import MetricsWriter, RunDirError, read_metrics


def test_second_run_into_the_same_dir_is_refused_then_overwritten(tiny_config_factory, tmp_path):
    cfg = from_dict(tiny_config_factory(steps=10, replicas=1))
    out = str(tmp_path / "run")
    run(cfg, out, progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match="--overwrite"):
        run(cfg, out, progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before  # nothing lost
    run(cfg, out, progress=False, overwrite=True)
    rows = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert sorted(r["step"] for r in rows if r["kind"] == "eval") == [0, 10]


def test_writer_resume_drops_rows_after_the_checkpoint(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in (10, 20, 30):
        w.write({"step": step, "kind": "train", "replica": 0, "loss": float(step)})
    w.close()
    w = MetricsWriter(str(tmp_path), tensorboard=False, resume_step=20)
    w.write({"step": 30, "kind": "train", "replica": 0, "loss": 3.0})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(10, 10.0), (20, 20.0), (30, 3.0)]


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n")
    assert load_config(str(path)).optimizer.lr == pytest.approx(1e-3)


def test_memory_string_is_shared_by_the_codistillers_of_a_process():
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 4) for _ in range(2)]
    cds = [Codistiller(m, "memory", replica=r + 40, num_replicas=42, exchange_every=1,
                       peers=[41 - r]) for r, m in enumerate(models)]
    for cd in cds:
        cd.publish_if_due(1)
    for cd in cds:
        cd.refresh_if_due(1)
    assert cds[0].teacher_versions() == {41: 1}
    t = cds[0].teachers[41].module
    assert torch.equal(t.weight, models[1].weight)
