"""vs-local-sgd (beyond the paper): at the same communication budget — one exchange of
weights every K steps — does codistillation beat averaging the weights?

Arms, all with 2 replicas of W workers except the baseline: sync SGD (N=1, the reference);
2-way codistillation (each replica distils from the other's weights of the last exchange);
local SGD (the replicas' weights replaced by their mean every K steps); DiLoCo (the mean
change since the last sync is a pseudo-gradient for an outer Nesterov step, lr 0.7,
momentum 0.9). The inner learning rate of every arm is tuned on one grid (tuning seed).
Target: the baseline's mean final validation metric. Bytes: tensor bytes one replica sends
and receives over the run (codistillation: its weights published + its peer's read;
averaging: its pseudo-gradient sent + the mean received).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .results import Section, plot_curves
from .scaling import IMAGE, LM, Setting, _cell, _steps
from .study import TUNE_SEED, ArmResult, Study, fmt, make_config, mean_spread, preamble, tuning_text

NAME = "vs-local-sgd"
WORKERS = 2
K = 50
STEPS = {"lm-scaling": 800}  # the language model's budget here (lm-scaling uses 600)


def arms(s: Setting, k: int) -> dict[str, dict[str, Any]]:
    """The arms' settings on top of the task's base config."""
    return {
        "sync SGD (N=1)": {"replicas": 1},
        "2-way codistillation": {"replicas": 2, "codistill.exchange_every": k},
        "local SGD": {"replicas": 2, "codistill.alpha": 0.0, "outer.every": k},
        "DiLoCo": {"replicas": 2, "codistill.alpha": 0.0, "outer.every": k, "outer.lr": 0.7,
                   "outer.momentum": 0.9},
    }


def _bytes(run: ArmResult) -> float:
    """Tensor bytes replica 0 sent and received over the run."""
    with open(os.path.join(run.dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    averaged = summary.get("bytes_averaged") or 0
    return (summary["bytes_published"].get("0", 0) + summary["bytes_read"].get("0", 0) + 2 * averaged)


def run_setting(study: Study, s: Setting) -> tuple[str, dict[str, Any], tuple[str, str, str]]:
    if study.quick:
        s = s.quick()
    k = 5 if study.quick else K
    w = 2 if study.quick else WORKERS
    task = s.name.split("-")[0]
    seeds = list(range(study.seeds))
    results: dict[str, list[ArmResult]] = {}
    lrs: dict[str, float] = {}
    tuning: dict[str, dict[float, float]] = {}
    budget = {} if study.quick else {"steps": STEPS.get(s.name, s.base["steps"])}
    bases = {f"{NAME}-{task}-" + label.split(" (")[0].replace(" ", "_"):
             make_config(dict(s.base, workers=w, **budget), sets).to_dict()
             for label, sets in arms(s, k).items()}
    tuned = study.tuned_arms(bases, s.lr_grid, seeds, s.metric, s.higher_is_better)
    for label, arm in zip(arms(s, k), tuned.values()):
        lrs[label], tuning[label], results[label] = arm.lr, arm.tuning, arm.runs
    ref = results["sync SGD (N=1)"]
    target = mean_spread([r.final(0, s.metric) for r in ref])[0]
    label_m = "validation loss" if s.metric == "loss" else f"validation {s.metric}"
    lines = [f"| arm | lr (tuned) | final {label_m} | steps to target | bytes per replica |",
             "|---|---|---|---|---|"]
    steps: dict[str, list[float]] = {}
    for label, runs in results.items():
        steps[label] = _steps(runs, target, s)
        mb = mean_spread([_bytes(r) / 1e6 for r in runs])[0]
        lines.append(f"| {label} | {lrs[label]:g} | {fmt([r.final(0, s.metric) for r in runs])} | "
                     f"{_cell(steps[label])} | {mb:.1f} MB |")
    png, rel = study.plot_path(f"{NAME}-{task}")
    plot_curves(png, {label: [r.curve(0, s.metric) for r in runs] for label, runs in results.items()},
                label_m, f"{NAME}: {task}, W={w}, K={k}", target)
    cmp = "≥" if s.higher_is_better else "≤"
    text = (f"### {task}\n\nW={w} workers per replica (batch {w * s.base['batch_size']}), K={k}, "
            f"{results['sync SGD (N=1)'][0].cfg.steps} steps; target: {label_m} {cmp} {target:.4f} "
            f"(sync SGD's mean final). Replica 0 of each run.\n\n" + "\n".join(lines)
            + f"\n\n![{task}]({rel})\n\nTuning on seed {TUNE_SEED}: {tuning_text(tuning)}.\n")
    finals = {label: mean_spread([r.final(0, s.metric) for r in runs])[0] for label, runs in results.items()}
    best = (max if s.higher_is_better else min)(list(finals)[1:], key=lambda a: finals[a])
    figures = {"target": target, "lrs": lrs, "tuning": tuning, "steps": steps, "finals": finals,
               "bytes": {label: [_bytes(r) for r in runs] for label, runs in results.items()}}
    others = ", ".join(f"{a} {finals[a]:.4f}" for a in list(finals)[1:])
    summary = (f"beyond the paper: codistillation vs weight averaging at one exchange per K ({task})",
               "not in the paper", f"best of the 2-replica arms: {best} ({others}; sync SGD "
               f"{finals[list(finals)[0]]:.4f})")
    return text, figures, summary


def run(study: Study) -> Section:
    """vs-local-sgd on the language model and the image task."""
    texts, figures, summary = [], {}, []
    for s in (LM, IMAGE):
        text, figs, row = run_setting(study, s)
        texts.append(text)
        figures[s.name.split("-")[0]] = figs
        summary.append(row)
    body = preamble(NAME, study, __doc__) + "\n".join(texts)
    if any(math.isnan(v) for f in figures.values() for v in f["finals"].values()):
        body += "\nSome arms have no final value (diverged or not run).\n"
    return Section(NAME, "Beyond the paper: codistillation vs local SGD and DiLoCo (vs-local-sgd)", body,
                   figures, summary)
