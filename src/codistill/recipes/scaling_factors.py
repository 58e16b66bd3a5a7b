"""scaling-factors: what decides claim 1? The image task at its scaling limit (W* = 8 from
image-scaling, batch 128 per replica), trained 2.5× longer with a cosine schedule (close to
convergence), with one factor changed per codistillation arm.

Arms (learning rate of each tuned on one grid with the tuning seed; same seeds and budget):
- **baseline**: sync SGD at W* (N=1).
- **codistillation**: 2 replicas as in image-scaling (disjoint halves, burn-in 150, K=50, α=1).
- **late burn-in**: distillation starts at half the budget (teachers of better quality).
- **α ramp**: α rises linearly over a third of the budget after the burn-in (no jump in
  the loss).
- **fresh teachers**: K=5 instead of 50 (staleness).
- **shared data**: both replicas draw batches from all the data.
- **less data**: the baseline and shared-data codistillation on 6,000 training images
  instead of 60,000 (capacity against data).
- **overfitting**: the same without augmentation, a regime where one model overfits and an
  ensemble gains most (added after the first eight arms had run, to test our account of
  them).

Targets: the baseline's mean validation accuracy at half the budget (every seed reaches
it) and at the end; the less-data and overfitting arms use their own baseline's. Steps to a target are
averaged over seeds and both replicas; the ratio is baseline / arm (paper: 1.27–2).
"""

from __future__ import annotations

import math
from typing import Any

from .results import Section, plot_curves
from .scaling import IMAGE, _cell, _steps
from .study import TUNE_SEED, ArmResult, Study, fmt, make_config, mean_spread, preamble, tuning_text

NAME = "scaling-factors"
WORKERS = 8  # image-scaling's W*
STEPS = 1500
LR_GRID = (0.003, 0.01, 0.03)
SMALL = 6000  # training images of the less-data arms



def arms(steps: int, small: int) -> dict[str, dict[str, Any]]:
    """label -> changes to the base config."""
    co = {"replicas": 2}
    return {
        "baseline": {},
        "codistillation": co,
        "late burn-in": {**co, "codistill.burn_in": steps // 2},
        "α ramp": {**co, "codistill.ramp": steps // 3},
        "fresh teachers (K=5)": {**co, "codistill.exchange_every": 5},
        "shared data": {**co, "data.shards": "shared"},
        "less data: baseline": {"data.max_train": small},
        "less data: codistillation, shared": {**co, "data.shards": "shared", "data.max_train": small},
        "overfitting: baseline": {"data.max_train": small, "data.augment": False},
        "overfitting: codistillation, shared": {**co, "data.shards": "shared", "data.max_train": small,
                                                "data.augment": False},
    }


def reference(label: str) -> str:
    """The baseline an arm is measured against: its group's (``GROUP: baseline``) or the main one."""
    return f"{label.split(':')[0]}: baseline" if ":" in label else "baseline"


def _base(quick: bool) -> dict[str, Any]:
    s = IMAGE.quick() if quick else IMAGE
    base = dict(s.base, workers=2 if quick else WORKERS)
    if not quick:
        base.update(steps=STEPS, eval={"every": 100, "batch_size": 500, "max_batches": 10})
    base["optimizer"] = {**base["optimizer"], "schedule": "cosine"}
    return base


def _per_replica(runs: list[ArmResult], fn) -> list[float]:
    return [fn(r, who) for r in runs for who in range(r.cfg.replicas)]


def run(study: Study) -> Section:
    """scaling-factors on Fashion-MNIST (target: validation accuracy)."""
    s = IMAGE
    base = _base(study.quick)
    grid = s.lr_grid[2:3] if study.quick else LR_GRID
    seeds = list(range(study.seeds))
    steps, small = base["steps"], 500 if study.quick else SMALL
    sets = arms(steps, small)
    bases = {f"{NAME}-{label.replace(' ', '_').replace(':', '')}": make_config(base, c).to_dict()
             for label, c in sets.items()}
    tuned = dict(zip(sets, study.tuned_arms(bases, grid, seeds, "acc", True).values()))

    def targets(ref: list[ArmResult]) -> tuple[float, float]:
        half = [dict(r.curve(0, "acc")) for r in ref]
        mid = max(st for st in half[0] if st <= steps // 2)
        return (mean_spread([h[mid] for h in half])[0], mean_spread([r.final(0, "acc") for r in ref])[0])

    lines = ["| arm | lr (tuned) | final acc (replicas) | ensemble acc | final loss | steps to half-budget "
             "target | ratio | steps to final target |", "|---|---|---|---|---|---|---|---|"]
    figures: dict[str, Any] = {"steps": steps, "workers": base["workers"], "arms": {}}
    ratios: dict[str, float] = {}
    for label, arm in tuned.items():
        ref = tuned[reference(label)]
        mid_target, final_target = targets(ref.runs)
        replicas = range(arm.runs[0].cfg.replicas)
        to_mid = [v for who in replicas for v in _steps(arm.runs, mid_target, s, who)]
        to_final = [v for who in replicas for v in _steps(arm.runs, final_target, s, who)]
        base_mid = mean_spread(_steps(ref.runs, mid_target, s))[0]
        arm_mid = mean_spread(to_mid)[0]
        ratios[label] = base_mid / arm_mid if arm_mid and math.isfinite(arm_mid) else math.nan
        acc = _per_replica(arm.runs, lambda r, w: r.final(w, "acc"))
        loss = _per_replica(arm.runs, lambda r, w: r.final(w, "loss"))
        ens = [r.final("ensemble", "acc") for r in arm.runs] if arm.runs[0].cfg.replicas > 1 else []
        lines.append(f"| {label} | {arm.lr:g} | {fmt(acc)} | {fmt(ens) if ens else '–'} | {fmt(loss)} | "
                     f"{_cell(to_mid)} | {ratios[label]:.2f} | {_cell(to_final)} |")
        figures["arms"][label] = {"lr": arm.lr, "tuning": arm.tuning, "acc": acc, "loss": loss,
                                  "ensemble_acc": ens, "targets": [mid_target, final_target],
                                  "steps_mid": to_mid, "steps_final": to_final, "ratio_mid": ratios[label]}
    png, rel = study.plot_path(NAME)
    plot_curves(png, {label: [r.curve(0, "acc") for r in arm.runs] for label, arm in tuned.items()
                      if ":" not in label},
                "validation acc (replica 0)", f"{NAME}: images, W={base['workers']}, {steps} steps, cosine")
    png_small, rel_small = study.plot_path(f"{NAME}-less-data")
    plot_curves(png_small, {label: [r.curve(who, "acc") for r in arm.runs for who in range(r.cfg.replicas)]
                            for label, arm in tuned.items() if ":" in label},
                "validation acc (every replica)",
                f"{NAME}: {small} training images (overfitting: no augmentation)")
    png_loss, rel_loss = study.plot_path(f"{NAME}-less-data-loss")
    plot_curves(png_loss, {label: [r.curve(who, "loss") for r in arm.runs for who in range(r.cfg.replicas)]
                           for label, arm in tuned.items() if ":" in label},
                "validation loss (every replica)", f"{NAME}: {small} training images, validation loss")
    codist = {k: v for k, v in ratios.items() if reference(k) != k}
    best = max(codist, key=lambda k: codist[k] if math.isfinite(codist[k]) else -math.inf)
    body = (preamble(NAME, study, __doc__) + "\n".join(lines) + f"\n\n![curves]({rel})\n\n"
            f"![less data]({rel_small})\n\n![less data, loss]({rel_loss})\n\n"
            f"Learning-rate tuning on seed {TUNE_SEED} (final accuracy): "
            + tuning_text({k: v.tuning for k, v in tuned.items()}) + ".\n")
    summary = [("1. what governs claim 1 (images, longer budget, one factor per arm)", "1.27–2× fewer steps",
                f"best arm: {best}, ratio {codist[best]:.2f} to the baseline's half-budget accuracy; "
                + ", ".join(f"{k} {v:.2f}" for k, v in codist.items() if k != best))]
    return Section(NAME, f"Claim 1: what governs it ({NAME})", body, figures, summary)
