"""Every built-in task trains behind one loop, in one process and under torchrun, and a task
defined outside the package trains from a config."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from codistill.cli import main
from codistill.config import ConfigError, from_dict
from codistill.engine import run
from codistill.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {"seed": 0, "replicas": 2, "workers": 1, "threads": 1, "log_every": 10,
                        "optimizer": {"name": "adam", "lr": 0.003},
                        "codistill": {"alpha": 1.0, "burn_in": 10, "exchange_every": 10},
                        "checkpoint": {"every": 20}}

TASKS: dict[str, dict[str, Any]] = {
    "image": {**copy.deepcopy(BASE), "task": "image", "steps": 60, "batch_size": 32,
              "model": {"name": "cnn", "width": 8, "hidden": 32},
              "data": {"max_train": 3000}, "eval": {"every": 30, "batch_size": 250, "max_batches": 4}},
    "resnet": {**copy.deepcopy(BASE), "task": "image", "steps": 40, "batch_size": 16,
               "model": {"name": "resnet", "width": 4, "blocks": 1},
               "data": {"max_train": 1000}, "eval": {"every": 20, "batch_size": 250, "max_batches": 2}},
    "movielens": {**copy.deepcopy(BASE), "task": "click", "steps": 80, "batch_size": 128,
                  "model": {"name": "click", "embed_dim": 8, "hidden": [32]},
                  "data": {"name": "movielens"}, "eval": {"every": 40, "batch_size": 1000, "max_batches": 4}},
    "adult": {**copy.deepcopy(BASE), "task": "click", "steps": 60, "batch_size": 128,
              "model": {"name": "click", "embed_dim": 4, "hidden": [16]},
              "data": {"name": "adult"}, "eval": {"every": 30, "batch_size": 1000, "max_batches": 4}},
    "criteo": {**copy.deepcopy(BASE), "task": "click", "steps": 60, "batch_size": 128,
               "model": {"name": "click", "embed_dim": 4, "hidden": [16], "cross_layers": 1},
               "data": {"name": "criteo", "rows": 20000, "val_rows": 2000, "buckets": 100},
               "eval": {"every": 30, "batch_size": 500}},
}


def _engine(name: str, out: Path, **over: Any) -> dict[str, Any]:
    values = {**copy.deepcopy(TASKS[name]), "name": name, **over}
    return run(from_dict(values), str(out), progress=False)


def _evals(rows: list[dict[str, Any]], replica: int) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["kind"] == "eval" and r["replica"] == replica),
                  key=lambda r: r["step"])


def _weights(run_dir: Path, replica: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"replica-{replica}" / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["image", "movielens", "adult", "criteo"])
def test_task_trains_two_codistilled_replicas(name: str, tmp_path: Path) -> None:
    summary = _engine(name, tmp_path)
    rows = read_metrics(str(tmp_path))
    for r in (0, 1):
        evals = _evals(rows, r)
        assert evals[-1]["loss"] < evals[0]["loss"] - 0.02, [e["loss"] for e in evals]
        train = [t for t in rows if t["kind"] == "train" and t["replica"] == r]
        assert any(t["distill_loss"] > 0 for t in train if t["step"] > 10)
    assert _max_diff(_weights(tmp_path, 0), _weights(tmp_path, 1)) > 1e-3
    final = summary["final"]
    assert 0 < final["churn"]["churn_prob"] < 1 and "ensemble" in final
    if name == "image":
        assert all(m["acc"] > 0.3 for m in final["models"]), final["models"]  # 10 classes: chance 0.1
    else:
        for m in final["models"]:
            assert 0.6 < m["auc"] <= 1 and 0.5 < m["calibration"] < 2, m
        assert all("auc" in e for e in _evals(rows, 0))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "criteo"])
def test_engine_stop_and_resume_is_exact(name: str, tmp_path: Path) -> None:
    """Batch-norm buffers, augmentation generator, teachers and data position all resume."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    _engine(name, whole)
    cfg = from_dict({**copy.deepcopy(TASKS[name]), "name": name})
    steps = cfg.steps
    run(cfg, str(part), progress=False, stop_at=steps // 2)
    assert sorted(p.name for p in (part / "checkpoints" / "replica-1").iterdir())[-1] == f"{steps // 2:010d}"
    resumed = run(cfg, str(part), progress=False, resume=True)
    assert resumed["start"] == steps // 2
    for r in (0, 1):
        assert _max_diff(_weights(whole, r), _weights(part, r)) == 0.0


# -- torchrun: the same numbers as the engine -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["image", "movielens"])
def test_torchrun_two_replicas_match_the_engine(name: str, tmp_path: Path) -> None:
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({**TASKS[name], "name": name}))
    engine_dir, dist_dir = tmp_path / "engine", tmp_path / "dist"
    _engine(name, engine_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
           "-m", "codistill", "train", str(cfg_path), "--out", str(dist_dir), "--no-progress",
           "--exchange", str(dist_dir / "exchange"), "--set", "codistill.sync=true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    engine_rows = read_metrics(str(engine_dir))
    for r in (0, 1):
        dist_rows = read_metrics(str(dist_dir / f"metrics-replica{r}.jsonl"))
        assert [e["loss"] for e in _evals(dist_rows, r)] == [e["loss"] for e in _evals(engine_rows, r)]
        assert _max_diff(_weights(engine_dir, r), _weights(dist_dir, r)) == 0.0
        manifest = json.loads(sorted((dist_dir / "exchange" / f"replica-{r}").glob("*.json"))[-1].read_text())
        assert manifest["meta"]["model"]["name"] == TASKS[name]["model"]["name"]


# -- a task of one's own ----------------------------------------------------------------------
def _custom(task: str) -> dict[str, Any]:
    return {"name": "blobs", "task": task, "steps": 60, "replicas": 2, "batch_size": 32, "threads": 1,
            "log_every": 20, "model": {"name": "mlp", "hidden": 32},
            "data": {"examples": 4000, "classes": 4, "dim": 8, "noise": 2.0},
            "codistill": {"burn_in": 20, "exchange_every": 10}, "eval": {"every": 30, "batch_size": 200}}


def test_task_defined_outside_the_package_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    for task, out in ((f"{ROOT / 'examples' / 'custom_task.py'}:BlobsTask", tmp_path / "file"),
                      ("custom_task:BlobsTask", tmp_path / "module")):
        summary = run(from_dict(_custom(task)), str(out), progress=False)
        rows = read_metrics(str(out))
        for r in (0, 1):
            evals = _evals(rows, r)
            assert evals[-1]["loss"] < evals[0]["loss"] - 0.3 and evals[-1]["acc"] > 0.5
        assert summary["final"]["churn"]["churn_prob"] > 0
    with pytest.raises(ConfigError, match="unknown config field 'data.exampels'"):
        from_dict({**_custom("custom_task:BlobsTask"), "data": {"exampels": 3}})


@pytest.mark.parametrize("task,message", [
    ("nope", "task must be one of"),
    ("no_such_module_xyz:Task", "cannot import"),
    ("codistill.losses:AlphaSchedule", "not a codistill Task subclass"),
])
def test_bad_task_names_are_config_errors(task: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict({"task": task})


def test_distill_kind_must_fit_the_task_output() -> None:
    assert from_dict({"task": "click"}).codistill.distill == "bce"
    assert from_dict({"task": "image"}).codistill.distill == "kl"
    with pytest.raises(ConfigError, match="codistill.distill 'kl' does not fit task 'click'"):
        from_dict({"task": "click", "codistill": {"distill": "kl"}})
    with pytest.raises(ConfigError, match="codistill.distill 'bce' does not fit task 'lm'"):
        from_dict({"task": "lm", "codistill": {"distill": "bce"}})
    with pytest.raises(ConfigError, match="data.pad must be >= 0"):
        from_dict({"task": "image", "data": {"pad": -1}})


def test_table_with_a_missing_column_fails_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture
                                                          ) -> None:
    csv = tmp_path / "clicks.csv"
    csv.write_text("user,item,price,clicked\n" + "".join(f"u{i % 7},i{i % 5},{i * 0.5},{i % 2}\n"
                                                         for i in range(200)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": "click", "steps": 5, "batch_size": 16, "data": {
        "name": "table", "path": str(csv), "label": "clicked", "categorical": ["user", "shop"],
        "numeric": ["price"]}}))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "shop" in err and "clicks.csv" in err
    assert not out.exists(), "a failed start must leave no run directory"
    cfg.write_text(cfg.read_text().replace("shop", "item"))
    assert main(["train", str(cfg), "--out", str(out), "--no-progress", "--set", "eval.every=5"]) == 0
    assert any(r["kind"] == "eval" and "auc" in r for r in read_metrics(str(out)))
