"""End to end: the one-process engine (Algorithm 1), its outputs, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from codistill.cli import main
from codistill.config import from_dict, load_config
from codistill.engine import build_corpus, run, val_batches
from codistill.metrics import evaluate_replicas, read_metrics
from codistill.models import LSTMLM, TransformerLM, build_model
from codistill.report import make_report

K, B = 5, 10  # exchange interval and burn-in of the tiny config


def _run(tmp_path_factory, values, name):
    cfg = from_dict(values)
    out = tmp_path_factory.mktemp(name)
    summary = run(cfg, str(out), progress=False)
    return {"cfg": cfg, "out": out, "summary": summary, "rows": read_metrics(str(out))}


def _rows(rows, kind, replica=None):
    return [r for r in rows if r["kind"] == kind and (replica is None or r["replica"] == replica)]


def _steps(rows, kind, replica=None):
    return [r["step"] for r in _rows(rows, kind, replica)]


@pytest.fixture(scope="module")
def codistill_run(tmp_path_factory, tiny_config_factory):
    return _run(tmp_path_factory, tiny_config_factory(name="codistill"), "codistill")


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, tiny_config_factory):
    return _run(tmp_path_factory, tiny_config_factory(name="baseline", replicas=1), "baseline")


def test_eval_ensemble_and_churn_rows(codistill_run):
    rows = codistill_run["rows"]
    for r in (0, 1):
        assert _steps(rows, "eval", r) == [0, 10, 20, 30]
    assert _steps(rows, "ensemble") == [0, 10, 20, 30]
    assert _steps(rows, "churn") == [0, 10, 20, 30]
    for step in (0, 10, 20, 30):
        ev = {r["replica"]: r for r in rows if r["kind"] == "eval" and r["step"] == step}
        ens = next(r for r in _rows(rows, "ensemble") if r["step"] == step)
        churn = next(r for r in _rows(rows, "churn") if r["step"] == step)
        assert all(math.isfinite(e["loss"]) and 0 <= e["acc"] <= 1 for e in ev.values())
        # -log of averaged probabilities never exceeds the average of -log (Jensen).
        assert ens["loss"] <= (ev[0]["loss"] + ev[1]["loss"]) / 2 + 1e-9
        assert ens["bpb"] / ens["loss"] == pytest.approx(ev[0]["bpb"] / ev[0]["loss"])
        assert 0 < churn["churn_prob"] <= 1 and 0 <= churn["churn_top1"] <= 1
    for r in (0, 1):  # it trains: byte-level loss starts near ln 256 and falls
        losses = [e["loss"] for e in _rows(rows, "eval", r)]
        assert losses[0] == pytest.approx(math.log(256), abs=0.2)
        assert losses[-1] < losses[0] - 0.5
    final = codistill_run["summary"]["final"]
    assert final["loss"] == [e["loss"] for e in rows if e["kind"] == "eval" and e["step"] == 30]


def test_train_rows_staleness_and_distillation(codistill_run):
    rows = codistill_run["rows"]
    for r, peer in ((0, "1"), (1, "0")):
        train = _rows(rows, "train", r)
        assert [t["step"] for t in train] == [5, 10, 15, 20, 25, 30]
        assert train[0]["staleness"] == {peer: None} and train[0]["staleness_max"] is None
        for t in train[1:]:  # teachers are loaded at step B=10 and refreshed every K steps
            assert t["staleness_max"] is not None and 0 <= t["staleness_max"] <= K
            assert t["staleness"] == {peer: t["staleness_max"]}
        for t in train:
            assert t["loss"] == pytest.approx(t["task_loss"] + t["alpha"] * t["distill_loss"], rel=1e-5)
            if t["step"] <= B:  # rows average steps (step-5, step]: all in burn-in
                assert t["alpha"] == 0.0 and t["distill_loss"] == 0.0
            else:
                assert t["alpha"] == 1.0 and t["distill_loss"] > 0.0
        assert train[-1]["bytes_published"] > 0 and train[-1]["bytes_read"] > 0
        # Published at 10, 15, 20, 25, 30: five versions, each read once by the peer.
        assert train[-1]["bytes_published"] == train[-1]["bytes_read"]


def test_run_directory_files(codistill_run):
    out, cfg = codistill_run["out"], codistill_run["cfg"]
    assert load_config(str(out / "config.yaml")).to_dict() == cfg.to_dict()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["replicas"] == 2
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("eval/loss/replica0", "eval/loss/replica1", "ensemble/loss",
                "churn/churn_prob", "train/distill_loss/replica0"):
        assert tag in tags
    logged = [(e.step, e.value) for e in acc.Scalars("eval/loss/replica1")]
    want = [(r["step"], r["loss"]) for r in _rows(codistill_run["rows"], "eval", 1)]
    assert [s for s, _ in logged] == [s for s, _ in want]
    assert [v for _, v in logged] == pytest.approx([v for _, v in want], rel=1e-6)


def test_saved_weights_load_and_reproduce_the_final_eval(codistill_run):
    out, cfg = codistill_run["out"], codistill_run["cfg"]
    models = []
    for r in (0, 1):
        path = out / f"replica-{r}" / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            spec = json.loads(f.metadata()["model"])
        assert spec["name"] == "lstm" and spec["vocab_size"] == 256 and spec["hidden_dim"] == 32
        model = build_model(spec)
        model.load_state_dict(load_file(str(path)), strict=True)
        models.append(model)
    res = evaluate_replicas(models, val_batches(build_corpus(cfg), cfg))
    assert res["loss"] == pytest.approx(codistill_run["summary"]["final"]["loss"], rel=1e-6)


def test_same_seed_same_metrics(codistill_run, tmp_path_factory, tiny_config_factory):
    again = _run(tmp_path_factory, tiny_config_factory(name="codistill"), "again")
    for kind in ("eval", "ensemble", "churn", "train"):
        a, b = _rows(codistill_run["rows"], kind), _rows(again["rows"], kind)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            keys = set(x) - {"step_time"}
            assert {k: x[k] for k in keys} == {k: y[k] for k in keys}


def test_alpha_zero_trains_independent_replicas(codistill_run, tmp_path_factory, tiny_config_factory):
    values = tiny_config_factory(name="independent")
    values["codistill"]["alpha"] = 0.0
    res = _run(tmp_path_factory, values, "alpha0")
    for t in _rows(res["rows"], "train"):
        assert t["distill_loss"] == 0.0 and t["alpha"] == 0.0
        assert t["bytes_published"] == 0 and t["staleness_max"] is None
    # Identical to the codistilled run until burn-in ends, different afterwards.
    for r in (0, 1):
        off = {e["step"]: e["loss"] for e in _rows(res["rows"], "eval", r)}
        on = {e["step"]: e["loss"] for e in _rows(codistill_run["rows"], "eval", r)}
        assert off[0] == on[0] and off[10] == on[10]
        assert off[20] != on[20] and off[30] != on[30]


def test_single_replica_baseline(baseline_run, codistill_run):
    rows = baseline_run["rows"]
    assert _steps(rows, "eval", 0) == [0, 10, 20, 30]
    assert not _rows(rows, "eval", 1) and not _rows(rows, "ensemble") and not _rows(rows, "churn")
    for t in _rows(rows, "train", 0):
        assert t["distill_loss"] == 0.0 and t["staleness"] == {} and t["bytes_published"] == 0
    assert sorted(p.name for p in baseline_run["out"].glob("replica-*")) == ["replica-0"]
    # Replica 0 of the codistilled run starts from the baseline's initial weights.
    assert _rows(rows, "eval", 0)[0]["loss"] == _rows(codistill_run["rows"], "eval", 0)[0]["loss"]
    final = baseline_run["summary"]["final"]
    assert "ensemble_loss" not in final and final["loss"][0] < _rows(rows, "eval", 0)[0]["loss"] - 0.5


def test_transformer_peer_for_an_lstm_replica(tmp_path_factory, tiny_config_factory):
    values = tiny_config_factory(name="mixed", steps=15)
    values["replica_models"] = [{}, {"name": "transformer", "dim": 16, "num_layers": 1, "heads": 2,
                                     "max_len": 32}]
    values["codistill"]["burn_in"] = 5
    res = _run(tmp_path_factory, values, "mixed")
    kinds = {}
    for r in (0, 1):
        path = res["out"] / f"replica-{r}" / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            spec = json.loads(f.metadata()["model"])
        model = build_model(spec)
        model.load_state_dict(load_file(str(path)), strict=True)
        kinds[r] = type(model)
        train = _rows(res["rows"], "train", r)
        assert all(t["distill_loss"] > 0 for t in train if t["step"] > 5)
        assert all(math.isfinite(e["loss"]) for e in _rows(res["rows"], "eval", r))
    assert kinds == {0: LSTMLM, 1: TransformerLM}


def _table(md: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("| run ") and len(cells) == 9:
            rows[(cells[0], cells[1])] = cells
    return rows


def test_report_on_runs(codistill_run, baseline_run, tmp_path):
    paths = make_report([str(baseline_run["out"]), str(codistill_run["out"])], str(tmp_path))
    png, md = Path(paths["png"]), Path(paths["md"])
    assert png == tmp_path / "report.png" and md == tmp_path / "report.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = md.read_text()
    assert "| run | model | final val loss |" in text
    table = _table(text)
    assert set(table) == {("baseline", "replica 0"), ("codistill", "replica 0"),
                          ("codistill", "replica 1"), ("codistill", "ensemble")}
    target = baseline_run["summary"]["final"]["loss"][0]  # default target: the baseline's final loss
    assert f"Target validation loss: {target:.4f}" in text
    assert table[("baseline", "replica 0")][2] == f"{target:.4f}"
    assert table[("baseline", "replica 0")][6] == "30"
    for r, loss in enumerate(codistill_run["summary"]["final"]["loss"]):
        assert table[("codistill", f"replica {r}")][2] == f"{loss:.4f}"
    churn = _rows(codistill_run["rows"], "churn")[-1]
    assert table[("codistill", "ensemble")][7] == f"{churn['churn_prob']:.4f}"


def test_cli_report(codistill_run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(codistill_run["out"]), "--out", str(out), "--target", "4.5"]) == 0
    printed = capsys.readouterr().out
    assert "| run | model |" in printed and "steps to 4.5000" in printed
    assert (out / "report.png").is_file() and (out / "report.md").read_text() in printed
    evals = _rows(codistill_run["rows"], "eval", 0)
    reached = next(e["step"] for e in evals if e["loss"] <= 4.5)
    assert _table((out / "report.md").read_text())[("codistill", "replica 0")][6] == str(reached)
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_cli_train(tiny_config_factory, tmp_path, capsys):
    values = tiny_config_factory(name="cli", steps=4, log_every=2)
    values["eval"]["every"] = 4
    (tmp_path / "c.yaml").write_text(json.dumps(values))  # JSON is YAML
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress",
                 "--set", "replicas=1", "--set", "eval.max_batches=1"]) == 0
    assert "final validation loss" in capsys.readouterr().out
    rows = read_metrics(str(out))
    assert _steps(rows, "train", 0) == [2, 4] and _steps(rows, "eval", 0) == [0, 4]
    assert load_config(str(out / "config.yaml")).replicas == 1
    assert torch.isfinite(torch.tensor([r["loss"] for r in rows if "loss" in r])).all()
