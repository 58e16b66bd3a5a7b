"""The lm-large recipe: its limit rule on hand-made curves, its quick run, its GPU profile."""

from __future__ import annotations

import json
import math
import os

import pytest

from codistill.data.linux import build_corpus, document_key, is_held_out
from codistill.recipes import lm_large, reproduce
from codistill.recipes.lm_large import doubling_steps, gain_fractions, scaling_limit, slope

BUDGET = 100


def _curve(final: float, reach: dict[float, int]) -> list[tuple[int, float]]:
    """Evaluations every 10 steps of a falling loss that first reaches each value of ``reach``
    at the step given, and ends at ``final``."""
    points = sorted(reach.items(), key=lambda kv: kv[1])
    out = []
    for step in range(0, BUDGET + 1, 10):
        value = 10.0
        for v, at in points:
            if step >= at:
                value = v
        out.append((step, min(value, 10.0) if step < BUDGET else final))
    return out


def test_doubling_continues_while_it_pays_and_stops_at_the_first_that_does_not():
    # W=1 ends at 3.0; W=2 reaches 3.0 at step 50 (pays) and ends at 2.5; W=4 reaches 2.5 at
    # step 80 (0.80 of the budget: a cut of 20%, pays); W=8 reaches 2.2 only at step 90 (no).
    curves = {1: _curve(3.0, {}), 2: _curve(2.5, {3.0: 50}), 4: _curve(2.2, {2.5: 80}),
              8: _curve(2.1, {2.2: 90})}
    assert doubling_steps(curves) == {2: 50.0, 4: 80.0, 8: 90.0}
    assert scaling_limit(curves, BUDGET) == (4, True)
    assert scaling_limit({w: curves[w] for w in (1, 2, 4)}, BUDGET) == (4, False)  # still paying
    # Exactly 85% of the budget pays (a cut of 15%); a batch that never reaches the target does not.
    edge = [(0, 10.0), (85, 3.0), (100, 2.9)]
    assert scaling_limit({1: _curve(3.0, {}), 2: edge}, BUDGET) == (2, False)
    assert scaling_limit({1: _curve(3.0, {}), 2: [(0, 10.0), (86, 3.0), (100, 2.9)]}, BUDGET) == (1, True)
    never = {1: _curve(3.0, {}), 2: _curve(3.1, {})}
    assert math.isnan(doubling_steps(never)[2]) and scaling_limit(never, BUDGET) == (1, True)
    # A later doubling that would pay again does not move the limit past the first that did not.
    curves[16] = _curve(2.0, {2.1: 20})
    assert scaling_limit(curves, BUDGET) == (4, True)


def test_gain_fractions_and_slope():
    base = [[(0, 5.0), (50, 3.0), (100, 2.0)], [(0, 5.0), (50, 3.2), (100, 2.2)]]
    ensemble = [[(0, 5.0), (50, 2.9), (100, 1.9)], [(0, 5.0), (50, 3.1), (100, 2.1)]]
    codistilled = [[(0, 5.0), (50, 3.15), (100, 2.05)], [(0, 5.0), (50, 3.15), (100, 2.05)]]
    rows = gain_fractions(base, ensemble, codistilled, [50, 100])
    assert rows[0] == pytest.approx((50, 0.1, -0.05, -0.5))
    assert rows[1] == pytest.approx((100, 0.1, 0.05, 0.5))
    assert math.isnan(gain_fractions(base, base, codistilled, [100])[0][3])  # no ensemble gain
    assert slope([(s, 10 - 0.01 * s) for s in range(0, 101, 10)]) == pytest.approx(-1.0)


@pytest.fixture
def mini_corpus(tmp_path, monkeypatch):
    """A corpus built from this package's source files (some under names that are held out),
    where lm-large looks for one."""
    src = os.path.dirname(os.path.dirname(lm_large.__file__))
    texts = [open(os.path.join(d, n), "rb").read() for d, _, names in os.walk(src) for n in sorted(names)
             if n.endswith(".py")]
    tree = tmp_path / "tree"
    held, i = 0, 0
    for i, text in enumerate(texts):
        (tree / "src").mkdir(parents=True, exist_ok=True)
        (tree / "src" / f"{i}.py").write_bytes(text)
    while held < 3:
        i += 1
        if is_held_out(document_key(f"held/{i}.py")):
            (tree / "held").mkdir(exist_ok=True)
            (tree / "held" / f"{i}.py").write_bytes(texts[held])
            held += 1
    build_corpus(str(tree), str(tmp_path / "data" / "linux"), source="codistill's source")
    monkeypatch.setenv("CODISTILL_DATA", str(tmp_path / "data"))
    return tmp_path


@pytest.mark.slow
def test_quick_run_fills_every_arm_and_a_rerun_trains_nothing(mini_corpus, tmp_path):
    out = tmp_path / "study"
    path = reproduce(["lm-large"], str(out), seeds=2, quick=True, jobs=2)
    fig = json.loads((out / "sections" / "lm-large" / "figures.json").read_text())["figures"]
    assert fig["limit"] in (1, 2) and set(fig["lrs"]) >= {"1", "2"}
    for key in ("steps_baseline", "steps_double", "steps_codistill", "steps_ensemble"):
        assert fig[key] and all(math.isfinite(v) for v in fig[key]), key
    assert len(fig["steps_codistill"]) == 4  # 2 seeds × 2 replicas
    assert fig["no_repeat"] is True and len(fig["codistill_settings"]) == 2
    assert all(math.isfinite(g) for _, g, _, _ in fig["gain_fractions"])
    assert all(math.isfinite(g) for _, _, g, _ in fig["independent_gain_fractions"])
    assert math.isfinite(fig["ratio_independent"])
    text = open(path, encoding="utf-8").read()
    assert "Claim 1 on data that never repeats (lm-large)" in text and "doubling pays" in text
    for png in ("lm-large-sweep.png", "lm-large-claim.png"):
        assert (out / "results" / png).stat().st_size > 1000
    arms = os.listdir(out / "arms")
    # sweep 2 W × 1 lr; at W*: base, 2·W*, independent pairs (2 seeds each, 2·W* may be in the
    # sweep's), 2 codistillation settings, codistillation seeds
    assert len(arms) >= 2 + 2 + 2 + 2 + 2 + 2 - 2
    again = lm_large.Study(str(out), seeds=2, quick=True)
    lm_large.run(again)
    assert again.ran == 0 and again.skipped == len(arms)


@pytest.mark.slow
def test_the_gpu_profile_is_valid_and_trains_a_few_steps_on_cpu(mini_corpus, tmp_path):
    from codistill.engine import run
    from codistill.recipes.study import make_config

    gpu = lm_large.PROFILES["gpu"]
    cfg = make_config(gpu.base, {"device": "cpu", "steps": 2, "batch_size": 2, "replicas": 2,
                                 "codistill.burn_in": 0, "codistill.exchange_every": 1,
                                 "eval.every": 2, "eval.batch_size": 2, "eval.max_batches": 1,
                                 "checkpoint.every": 0, "optimizer.lr": gpu.lr_grid[1]})
    assert cfg.precision == "bf16" and cfg.model["hidden_dim"] == 1024 and cfg.data.seq_len == 128
    summary = run(cfg, str(tmp_path / "gpu"), progress=False)
    losses = [m["loss"] for m in summary["final"]["models"]]
    assert len(losses) == 2 and all(math.isfinite(v) and v < math.log(256) + 0.5 for v in losses)
