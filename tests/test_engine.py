"""End to end: the one-process engine (Algorithm 1), its outputs, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from numerics import U32, log_loss_error, log_softmax_error, sigmoid_error, sum_tolerance
from safetensors import safe_open
from safetensors.torch import load_file

from codistill.checkpoint import read_state
from codistill.cli import main
from codistill.config import from_dict, load_config
from codistill.engine import run
from codistill.metrics import evaluate_models
from codistill.models import LSTMLM, TransformerLM, build_model
from codistill.report import make_report
from codistill.runlog import read_metrics
from codistill.tasks import build_task

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
    assert [m["loss"] for m in final["models"]] == [e["loss"] for e in _rows(rows, "eval") if e["step"] == 30]
    assert [m["acc"] for m in final["models"]] == [e["acc"] for e in _rows(rows, "eval") if e["step"] == 30]
    last_ens = _rows(rows, "ensemble")[-1]
    assert final["ensemble"]["loss"] == last_ens["loss"] and final["ensemble"]["acc"] == last_ens["acc"]
    last_churn = _rows(rows, "churn")[-1]
    assert final["churn"] == {k: last_churn[k] for k in ("churn_prob", "churn_top1")}
    assert final["count"] == 4 * 16 * 32  # eval.max_batches x eval.batch_size x seq_len predictions



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
            # Each row's losses come from two fp32 sums of 5 steps' values, Σφ and Σα·ψ (≤ 4u·Σ each,
            # all terms positive): loss = Σφ + Σα·ψ, ψ = Σα·ψ ÷ α (one more rounding); well within 15u.
            assert t["loss"] == pytest.approx(t["task_loss"] + t["alpha"] * t["distill_loss"], rel=30 * U32)
            if t["step"] <= B:  # rows average steps (step-5, step]: all in burn-in
                assert t["alpha"] == 0.0 and t["distill_loss"] == 0.0
            else:
                assert t["alpha"] == 1.0 and t["distill_loss"] > 0.0
        assert train[-1]["bytes_published"] > 0 and train[-1]["bytes_read"] > 0
        # Published at 10, 15, 20, 25, 30: five versions, each read once by the peer.
        assert train[-1]["bytes_published"] == train[-1]["bytes_read"]


def test_step_sums_form_the_logged_means_without_touching_the_steps_tensors():
    """The loop's sums of the step scalars: in place, in tensors of their own (the steps' stay
    as they were), ψ = α·ψ ÷ α per step even while α changes (a ramp), skipped steps out of the
    losses' means."""
    from codistill.loop import StepSums

    alphas, phis, psis = [0.0, 0.0, 0.25, 0.5, 0.5, 0.5, 1.0], [3.0, 2.5, 2.0, 1.75, 1.5, 1.25, 1.0], \
        [0.0, 0.0, 0.8, 0.6, 0.4, 0.2, 0.1]
    outs = [{"task_loss": torch.tensor(p), "distill_term": torch.tensor(a * q), "alpha": a, "skipped": 0.0,
             "step_time": 0.5} for a, p, q in zip(alphas, phis, psis)]
    outs.append({"task_loss": torch.tensor(0.0), "distill_term": torch.tensor(0.0), "alpha": 1.0,
                 "skipped": 1.0, "step_time": 0.5})
    before = [(o["task_loss"].item(), o["distill_term"].item()) for o in outs]
    sums = StepSums()
    for o in outs:
        sums.add(o)
    sums.scalars["exchange_time"] += 0.8
    means = sums.means(len(outs))
    assert [(o["task_loss"].item(), o["distill_term"].item()) for o in outs] == before
    assert list(means) == ["loss", "task_loss", "distill_loss", "alpha", "skipped", "step_time",
                           "exchange_time"]
    kept = len(phis)
    assert means["task_loss"] == pytest.approx(sum(phis) / kept)
    assert means["distill_loss"] == pytest.approx(sum(psis) / kept)
    assert means["loss"] == pytest.approx(sum(p + a * q for a, p, q in zip(alphas, phis, psis)) / kept)
    assert means["alpha"] == pytest.approx((sum(alphas) + 1.0) / 8) and means["skipped"] == 1 / 8
    assert means["step_time"] == pytest.approx(0.5) and means["exchange_time"] == pytest.approx(0.1)


def test_run_directory_files(codistill_run):
    out, cfg = codistill_run["out"], codistill_run["cfg"]
    assert load_config(str(out / "config.yaml")).to_dict() == cfg.to_dict()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["replicas"] == [0, 1]
    assert (summary["start"], summary["end"], summary["name"]) == (0, 30, "codistill")
    assert summary["wall_time_s"] > 0 and summary["steps_per_s"] == pytest.approx(30 / summary["wall_time_s"])
    assert summary["weights"] == [str(out / f"replica-{r}" / "model.safetensors") for r in (0, 1)]
    last = {r: _rows(codistill_run["rows"], "train", r)[-1] for r in (0, 1)}
    assert summary["bytes_published"] == {str(r): last[r]["bytes_published"] for r in (0, 1)}
    assert summary["bytes_read"] == {str(r): last[r]["bytes_read"] for r in (0, 1)}
    assert summary["final"] == json.loads(json.dumps(codistill_run["summary"]["final"]))
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
    # TensorBoard stores scalars in fp32: rounding to nearest is within u relative.
    assert [v for _, v in logged] == pytest.approx([v for _, v in want], rel=U32)


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
    task = build_task(cfg)
    res = evaluate_models(models, task.val_batches(cfg.eval.batch_size, cfg.eval.max_batches, "cpu"))
    final = codistill_run["summary"]["final"]
    assert [m["loss"] for m in res["models"]] == pytest.approx([m["loss"] for m in final["models"]], rel=1e-6)
    assert res["ensemble"]["loss"] == pytest.approx(final["ensemble"]["loss"], rel=1e-6)
    assert res["churn"]["churn_prob"] == pytest.approx(final["churn"]["churn_prob"], rel=1e-6)


def test_same_seed_same_metrics(codistill_run, tmp_path_factory, tiny_config_factory):
    again = _run(tmp_path_factory, tiny_config_factory(name="codistill"), "again")
    for kind in ("eval", "ensemble", "churn", "train"):
        a, b = _rows(codistill_run["rows"], kind), _rows(again["rows"], kind)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            keys = set(x) - {"step_time", "exchange_time"}  # wall-clock timings
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
    assert "ensemble" not in final and "churn" not in final and len(final["models"]) == 1
    assert final["models"][0]["loss"] < _rows(rows, "eval", 0)[0]["loss"] - 0.5


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


@pytest.mark.slow
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
    target = baseline_run["summary"]["final"]["models"][0]["loss"]  # default target: baseline's final
    assert f"Target validation loss: {target:.4f}" in text
    assert table[("baseline", "replica 0")][2] == f"{target:.4f}"
    assert table[("baseline", "replica 0")][6] == "30"
    for r, loss in enumerate(m["loss"] for m in codistill_run["summary"]["final"]["models"]):
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
    printed = capsys.readouterr().out
    rows = read_metrics(str(out))
    final = _rows(rows, "eval", 0)[-1]
    assert f"run cli: steps 0..4; validation loss per replica {final['loss']:.4f}\n" in printed
    assert "ensemble" not in printed  # one replica: no ensemble
    assert _steps(rows, "train", 0) == [2, 4] and _steps(rows, "eval", 0) == [0, 4]
    assert load_config(str(out / "config.yaml")).replicas == 1
    assert torch.isfinite(torch.tensor([r["loss"] for r in rows if "loss" in r])).all()


# -- checkpoints, stop and resume --------------------------------------------------------------
DROPOUT = {"name": "lstm", "embed_dim": 16, "hidden_dim": 32, "dropout": 0.2}
TIMINGS = {"step_time", "exchange_time"}  # wall-clock values, which no two runs share


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory, tiny_config_factory):
    """Uninterrupted N=2 run with dropout (per-replica RNG) and a checkpoint every 10 steps."""
    values = tiny_config_factory(name="dropout", model=dict(DROPOUT), checkpoint={"every": 10})
    return _run(tmp_path_factory, values, "dropout")


def _same_rows(a, b, kinds=("train", "eval", "ensemble", "churn")):
    for kind in kinds:
        x, y = _rows(a, kind), _rows(b, kind)
        assert [r["step"] for r in x] == [r["step"] for r in y] and x, kind
        for u, v in zip(x, y):
            assert {k: w for k, w in u.items() if k not in TIMINGS} == \
                   {k: w for k, w in v.items() if k not in TIMINGS}, (kind, u["step"])


def _final_weights(out):
    return {r: load_file(str(out / f"replica-{r}" / "model.safetensors")) for r in (0, 1)}


def _assert_bit_identical(a, b):
    for r in (0, 1):
        assert sorted(a[r]) == sorted(b[r])
        for k in a[r]:
            assert torch.equal(a[r][k], b[r][k]), (r, k)


def test_checkpoint_cadence_and_contents(dropout_run):
    root = dropout_run["out"] / "checkpoints"
    for r, peer in ((0, 1), (1, 0)):
        folder = root / f"replica-{r}"
        assert sorted(p.name for p in folder.iterdir()) == [f"{20:010d}", f"{30:010d}"]  # keep=2
        last = folder / f"{30:010d}"
        assert sorted(p.name for p in last.iterdir()) == [
            "manifest.json", "state", "trainer.pt", "worker-0.pt"]
        trainer = torch.load(last / "trainer.pt", weights_only=True)
        assert trainer["step"] == 30 and "teacher_versions" not in trainer and "bytes_read" not in trainer
        cd = trainer["codistiller"]
        assert cd["teachers"] == {peer: {"version": 30, "meta": cd["teachers"][peer]["meta"],
                                         "ident": ""}}  # no weights
        assert cd["teachers"][peer]["meta"]["replica"] == peer
        assert cd["last_exchange"] == 30
        row = _rows(dropout_run["rows"], "train", r)[-1]
        assert (cd["bytes_published"], cd["bytes_read"]) == (row["bytes_published"], row["bytes_read"])
        worker = torch.load(last / "worker-0.pt", weights_only=True)
        assert sorted(worker) == ["generator", "sampler", "torch_rng"]
        # The checkpointed weights are the final weights; the teacher is the peer's final version.
        final = _final_weights(dropout_run["out"])
        state = read_state(str(last))
        assert all(torch.equal(state["model"][k], final[r][k]) for k in final[r])
        teacher = state["teachers"][str(peer)]
        assert all(torch.equal(teacher[k], final[peer][k]) for k in final[peer])
        assert state["optimizer"]["state"]  # Adam's moments are saved


def test_per_replica_rng_makes_a_replica_independent_of_the_others(tiny_config_factory):
    """With dropout, replica 0 trained next to replica 1 equals replica 0 trained alone."""
    from codistill.exchange import MemoryExchange
    from codistill.replica import build_replica, replica_step

    cfg = from_dict(tiny_config_factory(model=dict(DROPOUT), codistill={"alpha": 0.0}))
    task = build_task(cfg)

    def train(indices, steps=4):
        reps = [build_replica(cfg, task, r, MemoryExchange(), cfg.batch_size) for r in indices]
        for step in range(steps):
            for rep in reps:
                torch.manual_seed(1000 + step)  # the global RNG must not matter either
                out = replica_step(rep, task, rep.next_batch(task, "cpu"), step, 1.0)
                assert all(isinstance(out[k], torch.Tensor) and out[k].dim() == 0
                           for k in ("task_loss", "distill_term"))
        return {k: v.clone() for k, v in reps[0].model.state_dict().items()}, reps[0]

    alone, rep_alone = train([0])
    together, rep_together = train([0, 1])
    for k in alone:
        assert torch.equal(alone[k], together[k]), k
    assert torch.equal(rep_alone.rng_state, rep_together.rng_state)
    # Dropout is really on: another RNG stream gives other weights.
    rep = build_replica(cfg, task, 0, MemoryExchange(), cfg.batch_size)
    rep.rng_state = torch.Generator().manual_seed(12345).get_state()
    for step in range(4):
        replica_step(rep, task, rep.next_batch(task, "cpu"), step, 1.0)
    assert any(not torch.equal(alone[k], v) for k, v in rep.model.state_dict().items())


@pytest.mark.slow
def test_cli_stop_and_resume_is_bit_identical(dropout_run, tmp_path, capsys):
    from codistill.config import ConfigError, dump_config

    cfg_path = tmp_path / "c.yaml"
    dump_config(dropout_run["cfg"], str(cfg_path))
    out = tmp_path / "run"
    base = ["train", str(cfg_path), "--out", str(out), "--no-progress"]
    assert main([*base, "--stop-at", "15"]) == 0
    assert "steps 0..15;" in capsys.readouterr().out
    stopped = json.loads((out / "summary.json").read_text())
    assert (stopped["start"], stopped["end"]) == (0, 15) and "weights" not in stopped
    assert not (out / "replica-0" / "model.safetensors").exists()
    for r in (0, 1):
        assert sorted(p.name for p in (out / "checkpoints" / f"replica-{r}").iterdir()) == [
            f"{10:010d}", f"{15:010d}"]
    # Not resumed: the run directory is refused; resumed with another batch size: named.
    assert main(base) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="batch_size"):
        run(from_dict({**dropout_run["cfg"].to_dict(), "batch_size": 4}), str(out), progress=False,
            resume=True)

    assert main([*base, "--resume"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["start"], summary["end"]) == (15, 30)
    final = summary["final"]
    assert final == json.loads((dropout_run["out"] / "summary.json").read_text())["final"]
    losses = ", ".join(f"{m['loss']:.4f}" for m in final["models"])
    assert (f"run dropout: steps 15..30; validation loss per replica {losses}; "
            f"ensemble {final['ensemble']['loss']:.4f}") in printed
    _assert_bit_identical(_final_weights(out), _final_weights(dropout_run["out"]))
    _same_rows(read_metrics(str(out)), dropout_run["rows"])


@pytest.mark.slow
def test_resume_skips_a_damaged_checkpoint(dropout_run, tmp_path):
    """A damaged newest checkpoint of one replica: every replica resumes from the newest step
    all of them have intact, and the result is still exact."""
    values = dropout_run["cfg"].to_dict()
    out = tmp_path / "run"
    first = run(from_dict(values), str(out), progress=False, stop_at=20)
    assert (first["start"], first["end"]) == (0, 20)
    damaged = out / "checkpoints" / "replica-1" / f"{20:010d}" / "trainer.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    done = run(from_dict(values), str(out), progress=False, resume=True)
    assert (done["start"], done["end"]) == (10, 30)
    _assert_bit_identical(_final_weights(out), _final_weights(dropout_run["out"]))
    _same_rows(read_metrics(str(out)), dropout_run["rows"])


def test_resume_without_checkpoints_starts_at_zero(tiny_config_factory, tmp_path):
    done = run(from_dict(tiny_config_factory(steps=5, replicas=1)), str(tmp_path / "run"),
               progress=False, resume=True)
    assert (done["start"], done["end"]) == (0, 5) and done["weights"]


# -- evaluation -------------------------------------------------------------------------------
def test_roc_auc_matches_a_pairwise_count_with_ties():
    from codistill.metrics import roc_auc

    g = torch.Generator().manual_seed(0)
    for n in (2, 7, 50, 301):
        scores = torch.randint(0, 6, (n,), generator=g).float() / 5  # many ties
        labels = torch.randint(0, 2, (n,), generator=g).float()
        labels[0], labels[-1] = 0.0, 1.0
        pos, neg = scores[labels == 1], scores[labels == 0]
        above = (pos[:, None] > neg[None, :]).double().sum()
        wins = above + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
        assert roc_auc(scores, labels) == pytest.approx(float(wins) / (len(pos) * len(neg)), abs=1e-12)
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    assert roc_auc(torch.tensor([0.9, 0.1]), torch.tensor([0, 1])) == 0.0
    assert math.isnan(roc_auc(torch.tensor([0.2, 0.7]), torch.tensor([1, 1])))


class _Fixed(torch.nn.Module):
    """Returns the logits stored for each input id (so evaluation has known predictions)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x]


def test_evaluate_models_categorical_by_hand():
    g = torch.Generator().manual_seed(3)
    n, classes = 30, 5
    tables = [torch.randn(n, classes, generator=g) for _ in range(3)]
    models = [_Fixed(t) for t in tables]
    ids, targets = torch.arange(n), torch.randint(0, classes, (n,), generator=g)
    batches = [(ids[:12], targets[:12]), (ids[12:], targets[12:])]
    res = evaluate_models(models, batches)
    assert res["count"] == n
    # float64 references from the same fp32 logits; the fp32 sums (per batch; the batches are then
    # added in float64) are within sum_tolerance of their terms, each within its own bound.
    logps = [torch.log_softmax(t.double(), -1) for t in tables]
    errs = [log_softmax_error(t) for t in tables]
    for m, lp, err in zip(res["models"], logps, errs):
        nll = -lp[ids, targets]
        assert abs(m["loss"] - float(nll.mean())) <= sum_tolerance(nll, err[ids, targets]) / n
        # accuracy counts argmaxes: the same fp32 logits in both, none within rounding of a tie
        top2 = lp.topk(2, -1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 2 * float(err.max())
        assert m["acc"] == pytest.approx(float((lp.argmax(-1) == targets).double().mean()))
    ens = torch.stack([lp.exp() for lp in logps]).mean(0)
    # logsumexp of the 3 log-probabilities − log 3: each is off by at most max(err), the logsumexp
    # of 3 terms and the subtraction round a few times more (2u·(|log p̄| + 5)).
    ens_nll = -ens[ids, targets].log()
    ens_err = torch.stack(errs).amax(0)[ids, targets] + 2 * U32 * (ens_nll + 5)
    assert abs(res["ensemble"]["loss"] - float(ens_nll.mean())) <= sum_tolerance(ens_nll, ens_err) / n
    assert res["ensemble"]["acc"] == pytest.approx(float((ens.argmax(-1) == targets).double().mean()))
    pairs = [(0, 1), (0, 2), (1, 2)]
    tv, tv_tol = 0.0, 0.0
    for i, j in pairs:  # ½·Σ|p_i − p_j| over n × 5 terms; each p = exp(log p): q·(err + 2u)
        diff = (logps[i].exp() - logps[j].exp()).abs()
        term_err = sum(lp.exp() * (errs[k] + 2 * U32) for k, lp in ((i, logps[i]), (j, logps[j])))
        tv += float(0.5 * diff.sum(-1).mean()) / 3
        tv_tol += 0.5 * sum_tolerance(diff, term_err + U32 * diff) / n / 3
    top1 = sum(float((logps[i].argmax(-1) != logps[j].argmax(-1)).double().mean()) for i, j in pairs) / 3
    assert abs(res["churn"]["churn_prob"] - tv) <= tv_tol
    assert res["churn"]["churn_top1"] == pytest.approx(top1)
    one = evaluate_models(models[:1], batches)
    assert set(one) == {"models", "count"} and one["models"] == [res["models"][0]]
    with pytest.raises(ValueError, match="output"):
        evaluate_models(models, batches, output="regression")
    with pytest.raises(ValueError, match="no batches"):
        evaluate_models(models, [])


def test_evaluate_models_binary_by_hand():
    g = torch.Generator().manual_seed(4)
    n = 40
    tables = [torch.randn(n, generator=g) * 2 for _ in range(2)]
    models = [_Fixed(t) for t in tables]
    ids, labels = torch.arange(n), (torch.rand(n, generator=g) < 0.4).float()
    from codistill.metrics import roc_auc

    res = evaluate_models(models, [(ids[:25], labels[:25]), (ids[25:], labels[25:])], output="binary")
    assert res["count"] == n
    probs = [torch.sigmoid(t.double()) for t in tables]
    p_errs = [sigmoid_error(t) for t in tables]

    def check(got, p, p_err):
        """float64 metrics of the exact p against the fp32 ones (p within p_err): log loss and
        calibration are means of 40 terms (sum_tolerance); accuracy and AUC are counts and ranks
        of the same fp32 logits, none within rounding of 0.5 or of another."""
        assert float((p - 0.5).abs().min()) > float(p_err.max())  # no prediction within rounding of 0.5
        assert float(p.sort().values.diff().min()) > 2 * float(p_err.max())  # nor of another
        loss = -(labels * p.log() + (1 - labels) * (1 - p).log())
        tol = sum_tolerance(loss, log_loss_error(p, labels, p_err)) / n
        assert abs(got["loss"] - float(loss.mean())) <= tol
        assert got["acc"] == pytest.approx(float(((p > 0.5).double() == labels).double().mean()))
        assert got["auc"] == pytest.approx(roc_auc(p, labels))
        calibration = float(p.mean() / labels.mean())
        assert abs(got["calibration"] - calibration) <= (sum_tolerance(p, p_err) / n / float(labels.mean())
                                                         + 2 * U32 * calibration)

    for got, p, p_err in zip(res["models"], probs, p_errs):
        check(got, p, p_err)
    # the ensemble's mean of two fp32 probabilities rounds twice more (2u·p)
    ens = (probs[0] + probs[1]) / 2
    check(res["ensemble"], ens, (p_errs[0] + p_errs[1]) / 2 + 2 * U32 * ens)
    diff = (probs[0] - probs[1]).abs()
    tol = sum_tolerance(diff, p_errs[0] + p_errs[1] + U32 * diff) / n
    assert abs(res["churn"]["churn_prob"] - float(diff.mean())) <= tol
    flips = ((probs[0] > 0.5) != (probs[1] > 0.5)).double().mean()
    assert res["churn"]["churn_top1"] == pytest.approx(float(flips))


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_crash_right_after_a_checkpoint_loses_no_metric_rows(tiny_config_factory, tmp_path, monkeypatch):
    from codistill.rundir import RunDir

    values = tiny_config_factory(steps=20, checkpoint={"every": 10})
    out = str(tmp_path / "run")
    write = RunDir.write

    def crash_at_step_10(self, row):
        if row["step"] == 10 and row["kind"] == "train":
            raise _Crash
        write(self, row)

    monkeypatch.setattr(RunDir, "write", crash_at_step_10)
    with pytest.raises(_Crash):
        run(from_dict(values), out, progress=False)
    monkeypatch.setattr(RunDir, "write", write)
    run(from_dict(values), out, progress=False, resume=True)
    rows = read_metrics(out)
    for r in (0, 1):
        assert _steps(rows, "train", r) == [5, 10, 15, 20]
        assert _steps(rows, "eval", r) == [0, 10, 20]
