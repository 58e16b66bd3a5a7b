"""offline: claim 4 — codistillation against two-phase (offline) distillation. Phase 1
trains two independent models (T steps, in parallel); phase 2 trains a fresh model for T
steps distilled from their ensemble (`codistill.teachers_from`, α=1 from the first step).
The offline pipeline's quality is the distilled model's final validation metric, reached
after 2T steps in sequence. 2-way codistillation trains for T steps; its steps to the same
quality are compared with 2T (paper: codistillation reaches it in far fewer total steps).
Every model sees all the data (shared), so the teachers are a normal ensemble.
"""

from __future__ import annotations

import math
from typing import Any

from .click_churn import LR_GRID, base_config
from .results import Section, plot_curves
from .scaling import IMAGE, Setting, _cell, _steps
from .study import TUNE_SEED, Study, fmt, make_config, mean_spread, preamble, tuning_text

NAME = "offline"
Row = tuple[str, str, str]

CLICK = Setting("click", "loss", False, LR_GRID, (1,), {}, "")


def run_setting(study: Study, s: Setting, base: dict[str, Any], task: str) -> tuple[str, dict[str, Any], Row]:
    seeds = list(range(study.seeds))
    steps = base["steps"]
    base = make_config(dict(base, replicas=2), {"data.shards": "shared"}).to_dict()
    grid = s.lr_grid[-1:] if study.quick else s.lr_grid
    pre, m, hib = f"{NAME}-{task}", s.metric, s.higher_is_better
    # phase 1: two independent models per seed
    phase1 = study.tuned_arm(make_config(base, {"codistill.alpha": 0.0}).to_dict(), f"{pre}-teachers", grid,
                             seeds, m, hib)
    teachers = phase1.runs
    # phase 2: a fresh model distilled from each seed's teachers (tuned with the tuning seed's teachers)
    tune_teachers = study.run(make_config(phase1.config, {"seed": TUNE_SEED, "name": f"{pre}-teachers-tune"}))

    def student(teacher_dir: str) -> dict[str, Any]:
        return make_config(base, {"replicas": 1, "codistill.burn_in": 0,
                                  "codistill.teachers_from": teacher_dir}).to_dict()

    lr2, tune2 = study.tune(student(tune_teachers.dir), "optimizer.lr", grid, TUNE_SEED, f"{pre}-student",
                            m, hib)
    students = [study.run(make_config(student(t.dir), {"optimizer.lr": lr2, "seed": k,
                                                       "name": f"{pre}-student-seed{k}"}))
                for k, t in zip(seeds, teachers)]
    codist = study.tuned_arm(base, f"{pre}-codistill", grid, seeds, m, hib)
    co, lr1, lr_co = codist.runs, phase1.lr, codist.lr
    tuning = {"phase 1 (independent) lr": phase1.tuning, "phase 2 (student) lr": tune2,
              "codistillation lr": codist.tuning}
    target = mean_spread([r.final(0, s.metric) for r in students])[0]
    co_steps = _steps(co, target, s)
    mean_co = mean_spread(co_steps)[0]
    ratio = mean_co / (2 * steps) if math.isfinite(mean_co) else math.nan
    label = "validation loss" if s.metric == "loss" else f"validation {s.metric}"
    ens = [r.final("ensemble", s.metric) for r in teachers]
    lines = [f"| arm | lr (tuned) | final {label} | steps to the offline quality | total steps |",
             "|---|---|---|---|---|",
             f"| phase 1: two independent models (ensemble) | {lr1:g} | {fmt(ens)} | – | {steps} |",
             f"| phase 2: student distilled from the ensemble | {lr2:g} | "
             f"{fmt([r.final(0, s.metric) for r in students])} | {steps} | {2 * steps} |",
             f"| 2-way codistillation (replica 0) | {lr_co:g} | {fmt([r.final(0, s.metric) for r in co])} | "
             f"{_cell(co_steps)} | {steps} |"]
    png, rel = study.plot_path(f"{NAME}-{task}")
    plot_curves(png, {"phase 1 model (replica 0)": [r.curve(0, s.metric) for r in teachers],
                      "phase 2 student (shifted by T)": [[(st + steps, v) for st, v in r.curve(0, s.metric)]
                                                         for r in students],
                      "2-way codistillation (replica 0)": [r.curve(0, s.metric) for r in co]},
                label, f"{NAME}: {task}", target)
    text = (f"### {task}\n\n" + "\n".join(lines) + f"\n\nOffline quality: {label} {target:.4f}. Steps of "
            f"codistillation to reach it / the offline pipeline's {2 * steps} steps: **{ratio:.2f}** "
            f"(goal ≤ 0.5).\n\n![{task}]({rel})\n\nTuning on seed {TUNE_SEED}: {tuning_text(tuning)}.\n")
    figures = {"target": target, "codistill_steps": co_steps, "ratio": ratio, "tuning": tuning,
               "student_finals": [r.final(0, s.metric) for r in students],
               "codistill_finals": [r.final(0, s.metric) for r in co]}
    summary = (f"4. vs offline distillation ({task})", "same quality in far fewer total steps",
               f"codistillation steps / offline total steps {ratio:.2f} ({_cell(co_steps)} vs {2 * steps})")
    return text, figures, summary


def run(study: Study) -> Section:
    """offline on MovieLens clicks and the image task."""
    texts, figures, summary = [], {}, []
    image = IMAGE.quick() if study.quick else IMAGE
    for s, base, task in ((CLICK, base_config("movielens", study.quick), "movielens"),
                          (image, dict(image.base, workers=2), "image")):
        text, figs, row = run_setting(study, s, base, task)
        texts.append(text)
        figures[task] = figs
        summary.append(row)
    body = preamble(NAME, study, __doc__) + "\n".join(texts)
    return Section(NAME, "Claim 4: against offline two-phase distillation (offline)", body, figures, summary)
