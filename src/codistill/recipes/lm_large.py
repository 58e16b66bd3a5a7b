"""lm-large: claim 1 under its own premise. On a corpus so large that no byte is read twice
and past the batch size where sync SGD stops scaling, does 2-way codistillation reach the
baseline's quality in fewer steps, and how much of the ensemble's gain does it capture?

Data: the Linux kernel's source (Debian's linux-source-6.12, 1.48 GB of text as one byte
stream in hash order of the files, 1% of the files held out; `codistill data linux`). Model:
a byte LSTM (embedding 32, hidden 64) on windows of 32 bytes; Adam, 50 warm-up steps, then a
constant learning rate, gradient clipping at 1. Every arm trains for the same number of steps.

1. Batch sweep (tuning seed). Batch W×b (W simulated workers of b = 128 sequences), the
   learning rate tuned for each W on one grid. Doubling W pays when the doubled batch
   reaches the smaller batch's final validation loss within 85% of the budget (a cut of
   at least 15% in steps to that target; perfect scaling reaches it at 50%). Doubling
   continues while it pays; the limit W* is the last batch a paying doubling reached, and
   the first doubling that does not pay is shown.
2. At W* (3 seeds): sync SGD at W* and at 2·W*; two independent replicas at W* on disjoint
   halves of the corpus (α = 0) and their ensemble (the most a peer can give); 2-way
   codistillation, each replica at W* on its half. Codistillation's burn-in (a fraction of
   the budget), α and exchange interval K are tuned on the tuning seed (one setting changed
   at a time), then its learning rate on the same grid as every other arm.
3. Claim target: the baseline's validation loss at three quarters of the budget, from its
   worst seed, so every seed reaches it. Steps to it per arm; the fraction of the
   ensemble's gain over the baseline that the codistilled replicas keep, at each quarter of
   the budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..runlog import steps_to_target
from .results import Section, plot_curves
from .scaling import _cell
from .study import TUNE_SEED, ArmResult, Study, fmt, make_config, mean_spread, preamble, tuning_text

log = logging.getLogger(__name__)

NAME = "lm-large"
LIMIT_GAIN = 0.15  # a doubling pays when it cuts the steps to the smaller batch's final loss by this much
CLAIM_FRACTION = 0.75  # the claim target: the baseline's value at this fraction of the budget
Curve = list[tuple[int, float]]


@dataclass(frozen=True)
class Profile:
    """The recipe's sizes: model, per-worker batch, budget, grids."""

    name: str
    base: dict[str, Any]
    lr_grid: tuple[float, ...]
    first_w: int
    max_w: int
    # Codistillation settings tried one at a time around the first (burn-in as a fraction of the budget).
    codistill_grid: tuple[dict[str, float], ...] = field(default=())

    @property
    def steps(self) -> int:
        return int(self.base["steps"])

    @property
    def b(self) -> int:
        return int(self.base["batch_size"])


CPU = Profile(
    "cpu",
    {"task": "lm", "steps": 800, "replicas": 1, "workers": 1, "batch_size": 128, "log_every": 50,
     "model": {"name": "lstm", "embed_dim": 32, "hidden_dim": 64},
     "data": {"name": "linux", "level": "byte", "seq_len": 32},
     "optimizer": {"name": "adam", "warmup": 50, "schedule": "constant", "grad_clip": 1.0},
     "codistill": {"alpha": 1.0, "burn_in": 200, "exchange_every": 25},
     "eval": {"every": 25, "batch_size": 512, "max_batches": 4}, "checkpoint": {"every": 200}},
    lr_grid=(0.01, 0.02, 0.04, 0.08, 0.16), first_w=1, max_w=64,
    codistill_grid=({"burn_in": 0.25, "alpha": 1.0, "exchange_every": 25},
                    {"burn_in": 0.5, "alpha": 1.0, "exchange_every": 25},
                    {"burn_in": 0.25, "alpha": 0.5, "exchange_every": 25},
                    {"burn_in": 0.25, "alpha": 1.0, "exchange_every": 100}),
)
# One H100/H200-class GPU, bf16: a 2-layer LSTM of 1024 on 128-byte windows; the core
# comparison (baseline, 2·W*, codistillation, independent pair at a given W*) in about 10 minutes.
GPU = Profile(
    "gpu",
    {**CPU.base, "steps": 2000, "batch_size": 256, "device": "cuda", "precision": "bf16", "threads": 0,
     "model": {"name": "lstm", "embed_dim": 256, "hidden_dim": 1024, "num_layers": 2},
     "data": {"name": "linux", "level": "byte", "seq_len": 128},
     "codistill": {"alpha": 1.0, "burn_in": 500, "exchange_every": 50},
     "eval": {"every": 50, "batch_size": 1024, "max_batches": 8}},
    lr_grid=(0.0005, 0.001, 0.002, 0.004), first_w=1, max_w=32,
    codistill_grid=({"burn_in": 0.25, "alpha": 1.0, "exchange_every": 50},
                    {"burn_in": 0.5, "alpha": 1.0, "exchange_every": 50}),
)
PROFILES = {p.name: p for p in (CPU, GPU)}


def quick(p: Profile) -> Profile:
    """The smoke-test size: a tiny model, 40 steps, one learning rate, W in {1, 2}, K = 5."""
    base = dict(p.base, steps=40, batch_size=4, log_every=10, device="cpu", precision="fp32",
                model={"name": "lstm", "embed_dim": 8, "hidden_dim": 16},
                data={**p.base["data"], "seq_len": 16},
                eval={"every": 10, "batch_size": 16, "max_batches": 2}, checkpoint={"every": 20},
                optimizer={**p.base["optimizer"], "warmup": 5})
    grid = tuple({**c, "exchange_every": 5} for c in p.codistill_grid[:2])
    return replace(p, base=base, lr_grid=p.lr_grid[1:2], first_w=1, max_w=2, codistill_grid=grid)


def doubling_steps(curves: dict[int, Curve]) -> dict[int, float]:
    """For each W after the first: the step at which the batch of W reached the final value
    of the batch of W/2 (NaN if it never did)."""
    ws = sorted(curves)
    out = {}
    for small, big in zip(ws, ws[1:]):
        reach = steps_to_target(curves[big], curves[small][-1][1]) if curves[small] else None
        out[big] = float(reach) if reach is not None else math.nan
    return out


def scaling_limit(curves: dict[int, Curve], budget: int) -> tuple[int, bool]:
    """(W*, found): W* is the last W reached by doublings that each paid, i.e. reached the
    smaller batch's final loss within (1 - LIMIT_GAIN) of the ``budget``; ``found`` is True
    when a doubling past W* was measured and did not pay."""
    ws = sorted(curves)
    steps = doubling_steps(curves)
    limit = ws[0]
    for w in ws[1:]:
        if not steps[w] <= (1 - LIMIT_GAIN) * budget:  # NaN (never reached) does not pay
            return limit, True
        limit = w
    return limit, False


def gain_fractions(base: list[Curve], ensemble: list[Curve], codistilled: list[Curve],
                   points: list[int]) -> list[tuple[int, float, float, float]]:
    """At each step of ``points``: (step, ensemble gain, codistillation gain, fraction), the
    gains being the mean baseline loss minus the mean ensemble / codistilled-replica loss."""
    def at(curves: list[Curve], step: int) -> float:
        vals = [dict(c).get(step, math.nan) for c in curves]
        return mean_spread(vals)[0]

    out = []
    for step in points:
        b = at(base, step)
        g_ens, g_co = b - at(ensemble, step), b - at(codistilled, step)
        out.append((step, g_ens, g_co, g_co / g_ens if g_ens > 0 else math.nan))
    return out


def slope(curve: Curve, start_fraction: float = 0.75) -> float:
    """Change of the loss per 100 steps over the last quarter of the run (least squares)."""
    end = curve[-1][0]
    pts = [(s, v) for s, v in curve if s >= start_fraction * end]
    if len(pts) < 2:
        return math.nan
    ms = sum(s for s, _ in pts) / len(pts)
    mv = sum(v for _, v in pts) / len(pts)
    den = sum((s - ms) ** 2 for s, _ in pts)
    return 100 * sum((s - ms) * (v - mv) for s, v in pts) / den if den else math.nan


def _steps(runs: list[ArmResult], target: float, who: int | str = 0) -> list[float]:
    out = []
    for r in runs:
        reach = steps_to_target(r.curve(who), target)
        out.append(float(reach) if reach is not None else math.nan)
    return out


def _config(p: Profile, w: int, **sets: Any) -> dict[str, Any]:
    values = make_config(p.base, {"workers": w, **sets}).to_dict()
    values.pop("name", None)
    return values


def _codistill_sets(p: Profile, setting: dict[str, float]) -> dict[str, Any]:
    return {"codistill.burn_in": int(setting["burn_in"] * p.steps), "codistill.alpha": setting["alpha"],
            "codistill.exchange_every": int(setting["exchange_every"])}


def _label(setting: dict[str, float]) -> str:
    return f"burn-in {setting['burn_in']:g}·T, α {setting['alpha']:g}, K {setting['exchange_every']:g}"


def _windows_read(run: ArmResult) -> int:
    return run.cfg.steps * run.cfg.workers * run.cfg.batch_size


def run(study: Study) -> Section:
    """The lm-large recipe at the study's profile (``cpu`` or ``gpu``)."""
    p = PROFILES[study.profile]
    if study.quick:
        p = quick(p)
    seeds = list(range(study.seeds))

    # 1. The batch sweep, doubling while it pays.
    sweep: dict[int, Any] = {}
    w = p.first_w
    while True:
        sweep[w] = study.tuned_arm(_config(p, w), f"{NAME}-W{w}", p.lr_grid, [])
        curves = {v: _tune_run(study, p, v, sweep[v].lr).curve(0) for v in sweep}
        limit, found = scaling_limit(curves, p.steps)
        if found or w >= p.max_w:
            break
        w *= 2
    double = 2 * limit
    if double not in sweep:  # the sweep stopped at max_w: still measure 2·W*
        sweep[double] = study.tuned_arm(_config(p, double), f"{NAME}-W{double}", p.lr_grid, [])
        curves[double] = _tune_run(study, p, double, sweep[double].lr).curve(0)
    doubling = doubling_steps(curves)

    # 2. The arms at W* with every seed.
    lr = sweep[limit].lr
    tuning: dict[str, dict[float, float]] = {f"W={v}": arm.tuning for v, arm in sweep.items()}
    def seeded(values: dict[str, Any], name: str) -> list[Any]:
        return [make_config(values, {"seed": s, "name": f"{NAME}-{name}-seed{s}"}) for s in seeds]

    base_cfg = _config(p, limit, **{"optimizer.lr": lr})
    big_cfg = _config(p, double, **{"optimizer.lr": sweep[double].lr})
    pair_cfg = _config(p, limit, replicas=2, **{"optimizer.lr": lr, "codistill.alpha": 0.0})
    grid_cfgs = [make_config(_config(p, limit, replicas=2, **{"optimizer.lr": lr, **_codistill_sets(p, c)}),
                             {"seed": TUNE_SEED, "name": f"{NAME}-codistill-W{limit}-tune-{i}"})
                 for i, c in enumerate(p.codistill_grid)]
    ran = study.run_all([*seeded(base_cfg, f"W{limit}"), *seeded(big_cfg, f"W{double}"),
                         *seeded(pair_cfg, f"independent-W{limit}"), *grid_cfgs])
    n = len(seeds)
    base, big, pair = ran[:n], ran[n:2 * n], ran[2 * n:3 * n]
    settings = {i: res.final_mean("loss") for i, res in enumerate(ran[3 * n:])}
    best = min(settings, key=lambda i: settings[i] if math.isfinite(settings[i]) else math.inf)
    chosen = p.codistill_grid[best]
    co_arm = study.tuned_arm(_config(p, limit, replicas=2, **_codistill_sets(p, chosen)),
                             f"{NAME}-codistill-W{limit}", p.lr_grid, seeds)
    tuning["codistill"] = co_arm.tuning
    co = co_arm.runs

    # 3. Figures.
    budget = p.steps
    claim_step = int(CLAIM_FRACTION * budget)
    at_claim = [dict(r.curve(0)).get(claim_step, math.nan) for r in base]
    reached = [v for v in at_claim if math.isfinite(v)]
    target = max(reached) if reached else math.nan
    steps_base = _steps(base, target)
    steps_big = _steps(big, target)
    steps_co = _steps(co, target, 0) + _steps(co, target, 1)
    steps_pair = _steps(pair, target, 0) + _steps(pair, target, 1)
    steps_ens = _steps(pair, target, "ensemble")
    mean_base, mean_co = mean_spread(steps_base)[0], mean_spread(steps_co)[0]
    ratio = mean_base / mean_co if mean_co and math.isfinite(mean_co) else math.nan
    mean_pair = mean_spread(steps_pair)[0]
    ratio_pair = mean_base / mean_pair if mean_pair and math.isfinite(mean_pair) else math.nan
    points = [budget * q // 4 for q in (1, 2, 3, 4)]
    evals = {s for s, _ in base[0].curve(0)} if base else set()
    points = [max((s for s in evals if s <= pt), default=pt) for pt in points]
    co_curves = [r.curve(who) for r in co for who in (0, 1)]
    base_curves, ens_curves = [r.curve(0) for r in base], [r.curve("ensemble") for r in pair]
    fractions = gain_fractions(base_curves, ens_curves, co_curves, points)
    # The control: the same two replicas without distillation (α = 0), same shards and seeds.
    pair_fractions = gain_fractions(base_curves, ens_curves, [r.curve(who) for r in pair for who in (0, 1)],
                                    points)
    co_ens_fractions = gain_fractions(base_curves, ens_curves, [r.curve("ensemble") for r in co], points)
    shard = study.task(base[0].cfg).train_size if base else 0
    b = p.b

    sweep_lines = ["| W | batch W×b | lr (tuned) | final loss (tuning seed) | target: final loss of W/2 | "
                   "steps to it | fraction of budget | doubling pays |", "|---|---|---|---|---|---|---|---|"]
    for v in sorted(sweep):
        final = curves[v][-1][1] if curves[v] else math.nan
        if v in doubling:
            prev = curves[v // 2][-1][1]
            st = doubling[v]
            pays = "yes" if st <= (1 - LIMIT_GAIN) * budget else "**no**"
            cells = f"{prev:.4f} | {'not reached' if math.isnan(st) else f'{st:.0f}'} | " \
                    f"{'–' if math.isnan(st) else f'{st / budget:.2f}'} | {pays}"
        else:
            cells = "– | – | – | (first)"
        at_edge = len(p.lr_grid) > 1 and sweep[v].lr in (min(p.lr_grid), max(p.lr_grid))
        edge = " (grid edge)" if at_edge else ""
        sweep_lines.append(f"| {v} | {v * b} | {sweep[v].lr:g}{edge} | {final:.4f} | {cells} |")
    found = double in doubling and not doubling[double] <= (1 - LIMIT_GAIN) * budget
    found_text = (f"The doubling from W={limit} to W={double} does not pay: **W* = {limit}** "
                  f"(batch {limit * b})." if found else
                  f"Every doubling up to W={max(sweep)} paid: the affordable batches stop short of the "
                  f"limit; the claim arms use W* = {limit}, the largest batch swept before the last.")
    arms = [("sync SGD, W*", lr, base, [r.final(0) for r in base], steps_base, 1),
            ("sync SGD, 2·W*", sweep[double].lr, big, [r.final(0) for r in big], steps_big, 1),
            ("independent replicas (α=0), W* each", lr, pair,
             [r.final(who) for r in pair for who in (0, 1)], steps_pair, 2),
            ("ensemble of the two independent replicas", None, pair, [r.final("ensemble") for r in pair],
             steps_ens, 2),
            ("2-way codistillation, W* each (replicas)", co_arm.lr, co,
             [r.final(who) for r in co for who in (0, 1)], steps_co, 2),
            ("ensemble of the two codistilled replicas", None, co, [r.final("ensemble") for r in co],
             _steps(co, target, "ensemble"), 2)]
    claim_lines = ["| arm | lr | final loss | steps to claim target | windows read per replica / shard |",
                   "|---|---|---|---|---|"]
    no_repeat = True
    for label, arm_lr, runs, finals, st, replicas in arms:
        read = _windows_read(runs[0]) if runs else 0
        per = shard // replicas if replicas else shard
        no_repeat &= read <= per
        claim_lines.append(f"| {label} | {'–' if arm_lr is None else f'{arm_lr:g}'} | {fmt(finals)} | "
                           f"{_cell(st)} | {read:,} / {per:,} |")
    frac_lines = ["| step | ensemble gain (nats) | independent replicas' gain (α=0) | "
                  "codistilled replicas' gain | fraction captured | of it beyond α=0 | "
                  "codistilled ensemble's gain |",
                  "|---|---|---|---|---|---|---|"]
    for (step, g_ens, g_co, frac), (_, _, g_ind, frac_ind), (_, _, g_coe, _) in zip(
            fractions, pair_fractions, co_ens_fractions):
        frac_lines.append(f"| {step} | {g_ens:+.4f} | {g_ind:+.4f} | {g_co:+.4f} | {frac:.2f} | "
                          f"{frac - frac_ind:+.2f} | {g_coe:+.4f} |")
    slope_base = mean_spread([slope(r.curve(0)) for r in base])

    png_sweep, rel_sweep = study.plot_path(f"{NAME}-sweep")
    plot_curves(png_sweep, {f"W={v} (batch {v * b}, lr {sweep[v].lr:g})": [curves[v]]
                            for v in sorted(sweep)},
                "validation loss (nats/byte)", f"{NAME}: sync-SGD batch sweep (tuning seed)")
    png_claim, rel_claim = study.plot_path(f"{NAME}-claim")
    plot_curves(png_claim, {f"sync SGD W*={limit}": [r.curve(0) for r in base],
                            f"sync SGD 2·W*={double}": [r.curve(0) for r in big],
                            "independent replicas": [r.curve(who) for r in pair for who in (0, 1)],
                            "their ensemble": [r.curve("ensemble") for r in pair],
                            "codistilled replicas": co_curves},
                "validation loss (nats/byte)", f"{NAME}: at W*={limit}", target)
    grid_text = "; ".join(f"{_label(c)} → {settings[i]:.4f}" for i, c in enumerate(p.codistill_grid))
    body = (preamble(NAME, study, __doc__)
            + (f"Profile `{p.name}` (`--profile {p.name}`). " if p.name != "cpu" else "")
            + f"Budget {budget} steps for every arm; learning-rate grid {list(p.lr_grid)}.\n\n"
            + "\n".join(sweep_lines) + f"\n\n{found_text}\n\n![sweep]({rel_sweep})\n\n"
            + f"Claim target: validation loss ≤ {target:.4f} (the baseline at W* at step {claim_step}, its "
              f"worst seed). Ratio of steps, baseline / codistilled replicas: **{ratio:.2f}**; baseline / "
              f"independent replicas (α=0, the same shards and seeds without distillation): "
              f"{ratio_pair:.2f}.\n\n"
            + "\n".join(claim_lines)
            + f"\n\nNo window read twice in any arm: **{'yes' if no_repeat else 'NO'}** (each replica reads "
              "steps × W × b windows of its contiguous shard, each window once).\n\n"
            + "Gains over the baseline at W* (mean over seeds; positive: lower loss than the baseline). "
              "\"Fraction captured\" is the codistilled replicas' gain as a fraction of the ensemble's; "
              "\"of it beyond α=0\" subtracts what the independent replicas gain without distilling:\n\n"
            + "\n".join(frac_lines) + f"\n\n![claim]({rel_claim})\n\n"
            + f"Distance from convergence: the baseline's loss still falls by {-slope_base[0]:.4f} ± "
              f"{slope_base[1]:.4f} nats per 100 steps over the last quarter of the budget.\n\n"
            + f"Codistillation settings (tuning seed {TUNE_SEED}, lr {lr:g}, mean final loss of the two "
              f"replicas): {grid_text}; chosen: {_label(chosen)}.\n\n"
            + f"Learning-rate tuning on seed {TUNE_SEED} (final loss): {tuning_text(tuning)}.\n")
    figures = {"profile": p.name, "limit": limit, "limit_found": found,
               "lrs": {v: a.lr for v, a in sweep.items()},
               "doubling_steps": doubling, "claim_target": target, "steps_baseline": steps_base,
               "steps_double": steps_big, "steps_codistill": steps_co, "steps_ensemble": steps_ens,
               "ratio": ratio, "ratio_independent": ratio_pair, "gain_fractions": fractions,
               "independent_gain_fractions": pair_fractions, "codistill_settings": settings,
               "codistill_chosen": chosen, "lr_codistill": co_arm.lr, "no_repeat": no_repeat,
               "tuning": tuning}
    summary = [("1. steps to the baseline's quality past the scaling limit, data never repeated (lm-large)",
                "≈2× fewer steps (Common Crawl LM, 2×128 vs 128 GPUs)",
                f"ratio baseline / codistillation {ratio:.2f} at W*={limit} ({_cell(steps_base)} vs "
                f"{_cell(steps_co)} steps), but {ratio_pair:.2f} for the same replicas without distillation "
                f"(α=0); at the end the codistilled replicas gain {fractions[-1][2]:+.3f} nats over the "
                f"baseline, the independent ones {pair_fractions[-1][2]:+.3f}, their ensemble "
                f"{fractions[-1][1]:+.3f}")]
    return Section(NAME, f"Claim 1 on data that never repeats ({NAME})", body, figures, summary)


def _tune_run(study: Study, p: Profile, w: int, lr: float) -> ArmResult:
    """The tuning-seed run of batch W at learning rate ``lr`` (trained by the sweep already)."""
    return study.run(make_config(_config(p, w), {"optimizer.lr": lr, "seed": TUNE_SEED,
                                                 "name": f"{NAME}-W{w}-tune-{lr:g}"}))
