"""A run directory is never silently mixed with another run; resume truncates metrics."""

from __future__ import annotations

import json

import pytest
import torch

from codistill import Codistiller, TeacherSpec
from codistill.config import from_dict, load_config
from codistill.engine import run
from codistill.exchange import MemoryExchange
from codistill.runlog import MetricsWriter, RunDirError, read_metrics


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


def test_one_memory_exchange_object_is_shared_by_the_codistillers_of_a_process():
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 4) for _ in range(2)]
    # The string "memory" cannot reach another Codistiller: it is refused, not silently private.
    with pytest.raises(ValueError, match="MemoryExchange"):
        Codistiller(models[0], "memory", replica=40, num_replicas=42, exchange_every=1)
    ex = MemoryExchange()
    cds = [Codistiller(m, ex, replica=r + 40, num_replicas=42, exchange_every=1,
                       teachers=TeacherSpec(peers=[41 - r])) for r, m in enumerate(models)]
    assert all(cd.exchange is ex for cd in cds)
    for cd in cds:
        cd.after_step(1)  # replica 40 refreshes before 41 publishes: nothing to load yet
    assert cds[0].teacher_versions() == {41: None} and cds[1].teacher_versions() == {40: 1}
    assert cds[0].refresh() == {41: 1}
    for cd, peer in zip(cds, models[::-1]):
        t = next(iter(cd.teachers.values())).module
        assert torch.equal(t.weight, peer.weight) and torch.equal(t.bias, peer.bias)


def test_a_fresh_run_refuses_leftover_versions_in_its_exchange(tiny_config_factory, tmp_path):
    ex = tmp_path / "exchange"
    cfg = from_dict(tiny_config_factory(steps=15, **{"codistill": {
        "burn_in": 5, "exchange_every": 5, "exchange": str(ex)}}))
    run(cfg, str(tmp_path / "a"), progress=False)
    left = sorted(p.name for p in (ex / "replica-1").iterdir())
    assert left  # the run published into the directory
    with pytest.raises(RunDirError, match="replica 0 from an earlier run"):
        run(cfg, str(tmp_path / "b"), progress=False)
    assert sorted(p.name for p in (ex / "replica-1").iterdir()) == left  # nothing deleted
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # and no half-started run dir
    run(cfg, str(tmp_path / "b"), progress=False, overwrite=True)


@pytest.mark.parametrize("key, value, field", [
    ("optimizer", {"lr": float("nan")}, "optimizer.lr"),
    ("codistill", {"alpha": float("inf")}, "codistill.alpha"),
    ("device", "gpu", "device"),
    ("data", {"max_chars": -5}, "data.max_chars"),
    ("model", {"name": "transformer", "max_len": 16}, "max_len"),
    ("backend", "nccl", "nccl"),
])
def test_more_bad_values_are_named(tiny_config_factory, key, value, field):
    from codistill.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(tiny_config_factory(**{key: value}))


def test_churn_between_runs(tiny_config_factory, tmp_path):
    from codistill.churn import churn_between

    outs = []
    for seed in (0, 1):
        out = str(tmp_path / f"seed{seed}")
        run(from_dict(tiny_config_factory(steps=10, replicas=1, seed=seed)), out, progress=False)
        outs.append(out)
    res = churn_between([(outs[0], 0), (outs[1], 0)])
    same = churn_between([(outs[0], 0), (outs[0], 0)])
    assert same["churn_prob"] == pytest.approx(0.0, abs=1e-6) and same["churn_top1"] == 0.0
    assert 0.0 < res["churn_prob"] < 1.0 and 0.0 < res["churn_top1"] <= 1.0
    final = json.loads((tmp_path / "seed0" / "summary.json").read_text())["final"]["models"][0]["loss"]
    assert res["loss"][0] == pytest.approx(final, rel=1e-5)  # the run's own validation subset


def test_resume_with_changed_settings_names_them(tiny_config_factory, tmp_path):
    from codistill.config import ConfigError
    from codistill.launch import run_distributed

    values = tiny_config_factory(steps=20, replicas=1)
    values["codistill"]["exchange"] = str(tmp_path / "ex")
    out = str(tmp_path / "run")
    first = run_distributed(from_dict(values), out, replica=0, stop_at=10, progress=False)
    assert (first["start"], first["end"]) == (0, 10)
    with pytest.raises(ConfigError, match="batch_size"):
        run_distributed(from_dict({**values, "batch_size": 4}), out, replica=0, resume=True,
                        progress=False)
    done = run_distributed(from_dict(values), out, replica=0, resume=True, progress=False)
    assert (done["start"], done["end"]) == (10, 20)


def test_check_fresh_exchange_refuses_then_clears_only_that_replica(tmp_path):
    from codistill.exchange import DirectoryExchange
    from codistill.rundir import check_fresh_exchange

    ex = DirectoryExchange(str(tmp_path / "ex"))
    state = {"w": torch.zeros(3)}
    for step in (5, 10):
        ex.publish(0, step, state, {})
    ex.publish(1, 5, state, {})
    check_fresh_exchange(ex, 2, overwrite=False)  # nothing of replica 2: fine
    with pytest.raises(RunDirError, match=r"versions \[5, 10\] of replica 0"):
        check_fresh_exchange(ex, 0, overwrite=False)
    assert ex.versions(0) == [5, 10]
    check_fresh_exchange(ex, 0, overwrite=True)
    assert ex.versions(0) == [] and ex.versions(1) == [5]


def test_overwrite_replaces_an_earlier_runs_checkpoints(tiny_config_factory, tmp_path):
    out = tmp_path / "run"
    values = tiny_config_factory(steps=10, replicas=1, checkpoint={"every": 4, "keep": 5})
    run(from_dict(values), str(out), progress=False)
    folder = out / "checkpoints" / "replica-0"
    assert sorted(int(p.name) for p in folder.iterdir()) == [4, 8, 10]
    values["steps"] = 6
    with pytest.raises(RunDirError, match="checkpoints of replica 0"):
        # metrics removed by hand: the checkpoints alone still mark the directory as taken
        (out / "metrics.jsonl").unlink()
        run(from_dict(values), str(out), progress=False)
    run(from_dict(values), str(out), progress=False, overwrite=True)
    assert sorted(int(p.name) for p in folder.iterdir()) == [4, 6]
    assert json.loads((out / "summary.json").read_text())["end"] == 6
