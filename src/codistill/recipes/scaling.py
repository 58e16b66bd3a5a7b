"""lm-scaling and image-scaling: claim 1. Past the batch size where sync SGD stops
scaling, does 2-way codistillation reach the baseline's quality in fewer steps?

1. Sweep the sync-SGD batch W×b (W simulated workers of b examples), the learning rate
   tuned for every W on one grid (tuning seed; criterion: the final validation metric).
2. Sweep target: the worst final value of any baseline run, so every baseline reaches it;
   steps to it for each W. The scaling limit W* is the largest W whose doubling from W/2
   still cut those steps by 15% or more (so a noisy plateau does not end the sweep early).
3. 2-way codistillation, each replica at W* workers, learning rate tuned on the same grid.
   Claim target: the mean final value of the baseline at W*. Steps to it for the baseline
   and for each codistilled replica, per seed; the ratio baseline / codistillation (paper:
   about 2 on its language model; 27% fewer steps to 75% accuracy on ImageNet).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from ..runlog import steps_to_target
from .results import Section, plot_curves
from .study import TUNE_SEED, ArmResult, Study, fmt, mean_spread, preamble, tuning_text

log = logging.getLogger(__name__)

LIMIT_GAIN = 0.15  # doubling the batch must cut steps to target by at least this much


@dataclass(frozen=True)
class Setting:
    """What differs between the language-model and the image version of the recipe."""

    name: str
    metric: str  # validation metric the targets use
    higher_is_better: bool
    lr_grid: tuple[float, ...]
    workers: tuple[int, ...]
    base: dict[str, Any]
    paper: str

    def quick(self) -> Setting:
        base = dict(self.base, steps=30, log_every=10, eval={**self.base["eval"], "every": 10})
        base["codistill"] = {**base["codistill"], "burn_in": 10, "exchange_every": 5}
        base["model"] = QUICK_MODELS[self.name]
        base["data"] = {**base["data"], **QUICK_DATA[self.name]}
        return Setting(self.name, self.metric, self.higher_is_better, self.lr_grid[2:3], self.workers[:2],
                       base, self.paper)


LM = Setting(
    "lm-scaling", "loss", False, (0.003, 0.01, 0.03), (1, 2, 4, 8),
    {"task": "lm", "steps": 600, "replicas": 1, "batch_size": 32, "log_every": 50,
     "model": {"name": "lstm", "embed_dim": 64, "hidden_dim": 128},
     "data": {"name": "bible", "level": "byte", "seq_len": 32},
     "optimizer": {"name": "adam", "warmup": 50, "schedule": "constant"},
     "codistill": {"alpha": 1.0, "burn_in": 200, "exchange_every": 50},
     "eval": {"every": 50, "batch_size": 64, "max_batches": 16}},
    "≈2× fewer steps (Common Crawl LM, 2×128 vs 128 GPUs)")
IMAGE = Setting(
    "image-scaling", "acc", True, (0.001, 0.003, 0.01, 0.03), (1, 2, 4, 8, 16),
    {"task": "image", "steps": 600, "replicas": 1, "batch_size": 16, "log_every": 50,
     "model": {"name": "cnn", "width": 16, "hidden": 64},
     "data": {"name": "fashion-mnist", "augment": True},
     "optimizer": {"name": "adam", "warmup": 50, "schedule": "constant"},
     "codistill": {"alpha": 1.0, "burn_in": 150, "exchange_every": 50},
     "eval": {"every": 50, "batch_size": 500, "max_batches": 4}},
    "27% fewer steps to 75% top-1 (ImageNet ResNet-50)")
QUICK_MODELS = {"lm-scaling": {"name": "lstm", "embed_dim": 8, "hidden_dim": 16},
                "image-scaling": {"name": "cnn", "width": 4, "hidden": 8}}
QUICK_DATA = {"lm-scaling": {"max_chars": 30000}, "image-scaling": {"max_train": 2000}}


def scaling_limit(steps: dict[int, float]) -> int:
    """The largest W whose doubling from W/2 still cut the steps to target by LIMIT_GAIN or
    more (the smallest W if no doubling did): past it, within the sweep, doubling stops
    paying. A plateau followed by further gains (noise) does not end the sweep early."""
    ws = sorted(steps)
    limit = ws[0]
    for w, nxt in zip(ws, ws[1:]):
        if steps[nxt] <= (1 - LIMIT_GAIN) * steps[w]:
            limit = nxt
    return limit


def _steps(runs: list[ArmResult], target: float, s: Setting, who: int = 0) -> list[float]:
    out = []
    for r in runs:
        reach = steps_to_target(r.curve(who, s.metric), target, s.higher_is_better)
        out.append(float(reach) if reach is not None else math.nan)
    return out


def _cell(values: list[float]) -> str:
    reached = [v for v in values if math.isfinite(v)]
    if not reached:
        return "not reached"
    cell = fmt(reached, 0)
    return cell if len(reached) == len(values) else f"{cell} ({len(reached)}/{len(values)} reached)"


def run_setting(study: Study, s: Setting) -> Section:
    if study.quick:
        s = s.quick()
    seeds = list(range(study.seeds))
    worst = min if s.higher_is_better else max
    base: dict[int, list[ArmResult]] = {}
    lrs: dict[int, float] = {}
    tuning: dict[str, dict[float, float]] = {}
    sweep_arms = study.tuned_arms({f"{s.name}-W{w}": dict(s.base, workers=w) for w in s.workers}, s.lr_grid,
                                  seeds, s.metric, s.higher_is_better)
    for w, arm in zip(s.workers, sweep_arms.values()):
        lrs[w], tuning[f"W={w}"], base[w] = arm.lr, arm.tuning, arm.runs
    sweep_target = worst(r.final(0, s.metric) for runs in base.values() for r in runs)
    sweep = {w: _steps(runs, sweep_target, s) for w, runs in base.items()}
    limit = scaling_limit({w: mean_spread(v)[0] for w, v in sweep.items()})

    arm = study.tuned_arm(dict(s.base, workers=limit, replicas=2), f"{s.name}-codistill-W{limit}", s.lr_grid,
                          seeds, s.metric, s.higher_is_better)
    lr_co, tuning["codistill"], co = arm.lr, arm.tuning, arm.runs
    target = mean_spread([r.final(0, s.metric) for r in base[limit]])[0]
    steps_base = _steps(base[limit], target, s)
    steps_co = [_steps(co, target, s, who) for who in (0, 1)]
    mean_base = mean_spread(steps_base)[0]
    mean_co = mean_spread(steps_co[0] + steps_co[1])[0]
    ratio = mean_base / mean_co if mean_co and math.isfinite(mean_co) else math.nan

    label = "validation loss" if s.metric == "loss" else f"validation {s.metric}"
    sweep_lines = ["| workers W | batch W×b | lr (tuned) | final " + label + " | steps to sweep target |",
                   "|---|---|---|---|---|"]
    b = s.base["batch_size"]
    for w in s.workers:
        sweep_lines.append(f"| {w} | {w * b} | {lrs[w]:g} | "
                           f"{fmt([r.final(0, s.metric) for r in base[w]])} | {_cell(sweep[w])} |")
    finals = fmt([r.final(0, s.metric) for r in base[limit]])
    claim_lines = ["| arm | lr (tuned) | final " + label + " | steps to claim target |", "|---|---|---|---|",
                   f"| baseline, W={limit} | {lrs[limit]:g} | {finals} | {_cell(steps_base)} |"]
    for who in (0, 1):
        claim_lines.append(f"| 2-way codistillation, replica {who}, W={limit} each | {lr_co:g} | "
                           f"{fmt([r.final(who, s.metric) for r in co])} | {_cell(steps_co[who])} |")
    ens = [r.final("ensemble", s.metric) for r in co]
    claim_lines.append(f"| ensemble of the two codistilled replicas | – | {fmt(ens)} | "
                       f"{_cell(_steps(co, target, s, 'ensemble'))} |")  # type: ignore[arg-type]

    png_sweep, rel_sweep = study.plot_path(f"{s.name}-sweep")
    plot_curves(png_sweep, {f"W={w} (b={w * b})": [r.curve(0, s.metric) for r in base[w]] for w in s.workers},
                label, f"{s.name}: sync-SGD batch sweep", sweep_target)
    png_claim, rel_claim = study.plot_path(f"{s.name}-codistill")
    plot_curves(png_claim, {f"baseline W={limit}": [r.curve(0, s.metric) for r in base[limit]],
                            "codistilled replica 0": [r.curve(0, s.metric) for r in co],
                            "codistilled replica 1": [r.curve(1, s.metric) for r in co]},
                label, f"{s.name}: 2-way codistillation at W={limit}", target)
    cmp = "≥" if s.higher_is_better else "≤"
    body = (preamble(s.name, study, __doc__)
            + f"Sweep target: {label} {cmp} {sweep_target:.4f}; scaling limit W* = {limit}.\n\n"
            + "\n".join(sweep_lines) + f"\n\n![sweep]({rel_sweep})\n\nClaim target: {label} {cmp} "
            f"{target:.4f} (the baseline's mean final value at W={limit}). Ratio of steps, baseline / "
            f"codistillation (mean over seeds and replicas that reached it): **{ratio:.2f}**.\n\n"
            + "\n".join(claim_lines) + f"\n\n![codistillation]({rel_claim})\n\n"
            f"Learning-rate tuning on seed {TUNE_SEED} (final {label}): {tuning_text(tuning)}.\n")
    figures = {"sweep_target": sweep_target, "limit": limit, "lrs": lrs, "lr_codistill": lr_co,
               "sweep_steps": sweep, "claim_target": target, "steps_baseline": steps_base,
               "steps_codistill": steps_co, "ratio": ratio, "tuning": tuning}
    summary = [(f"1. steps to the baseline's quality past the scaling limit ({s.name.split('-')[0]})",
                s.paper, f"ratio baseline / codistillation {ratio:.2f} at W*={limit} "
                f"({_cell(steps_base)} vs {_cell(steps_co[0] + steps_co[1])} steps)")]
    title = "Claim 1: " + ("language model" if s.name.startswith("lm") else "images") + f" ({s.name})"
    return Section(s.name, title, body, figures, summary)


def run_lm(study: Study) -> Section:
    """lm-scaling on the Bible byte LM."""
    return run_setting(study, LM)


def run_image(study: Study) -> Section:
    """image-scaling on Fashion-MNIST (target: validation accuracy)."""
    return run_setting(study, IMAGE)
