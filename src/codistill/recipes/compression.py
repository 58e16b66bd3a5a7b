"""compression (beyond the paper): what compressed versions cost. 2-way codistillation with
each version published as fp32, bf16 or int8 (`codistill.publish_dtype`), on the byte LM
(lm-scaling's setting, W=2 per replica) and on MovieLens-100k clicks (the ablations'
reference). Per dtype: the bytes of one version, ψ averaged over the last quarter of the
budget (how far the replicas still are from their teachers), and the final validation
metric; every arm's learning rate tuned on one grid with the tuning seed. The time a
refresh takes per dtype is measured by `benchmarks/exchange_stall.py --dtype`.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..losses import AlphaSchedule
from .click_churn import LR_GRID, base_config
from .results import Section, plot_curves
from .scaling import LM
from .study import ArmResult, Study, fmt, mean_spread, preamble, tuning_text

NAME = "compression"
DTYPES = ("fp32", "bf16", "int8")


def settings(quick: bool) -> dict[str, tuple[dict[str, Any], tuple[float, ...], str]]:
    """``{task: (base config, learning-rate grid, metric)}``."""
    lm = LM.quick() if quick else LM
    click = dict(base_config("movielens", quick), replicas=2)
    return {"lm": (dict(lm.base, workers=2, replicas=2), lm.lr_grid, "loss"),
            "movielens": (click, LR_GRID[2:4] if quick else LR_GRID, "loss")}


def publishes(run: ArmResult) -> int:
    """How many versions replica 0 published: the exchange steps where distillation is on
    within the next K steps (``Codistiller.exchange_due``)."""
    c = run.cfg.codistill
    alpha, k = AlphaSchedule(c.alpha, c.burn_in, c.ramp), c.exchange_every
    return sum(1 for s in range(k, run.cfg.steps + 1, k) if alpha(s + k - 1) > 0)


def version_bytes(run: ArmResult) -> float:
    """Tensor bytes of one of replica 0's versions, as stored."""
    rows = [r for r in run.rows if r.get("kind") == "train" and r.get("replica") == 0]
    n = publishes(run)
    return rows[-1]["bytes_published"] / n if rows and n else float("nan")


def late_psi(run: ArmResult, fraction: float = 0.75) -> float:
    """ψ (without α) averaged over the logged steps of the last quarter, both replicas."""
    start = fraction * run.cfg.steps
    vals = [r["distill_loss"] for r in run.rows if r.get("kind") == "train" and r["step"] >= start
            and r.get("alpha", 0) > 0]
    return statistics.fmean(vals) if vals else float("nan")


def run(study: Study) -> Section:
    """Compressed versions on the LM and on clicks."""
    seeds = list(range(study.seeds))
    lines = ["| task | publish dtype | lr (tuned) | bytes per version | vs fp32 | ψ, last quarter | "
             "final validation loss (both replicas) | vs fp32 |", "|---|---|---|---|---|---|---|---|"]
    figures: dict[str, Any] = {}
    tuning: dict[str, dict[float, float]] = {}
    plots = []
    for task, (base, grid, metric) in settings(study.quick).items():
        bases = {f"{NAME}-{task}-{d}": dict(base, codistill={**base["codistill"], "publish_dtype": d})
                 for d in DTYPES}
        arms = study.tuned_arms(bases, grid, seeds, metric)
        results = {d: arms[f"{NAME}-{task}-{d}"] for d in DTYPES}
        ref_bytes = mean_spread([version_bytes(r) for r in results["fp32"].runs])[0]
        ref_final = mean_spread([r.final_mean(metric) for r in results["fp32"].runs])[0]
        for d, arm in results.items():
            tuning[f"{task} {d}"] = arm.tuning
            size = mean_spread([version_bytes(r) for r in arm.runs])[0]
            finals = [r.final_mean(metric) for r in arm.runs]
            psi = [late_psi(r) for r in arm.runs]
            lines.append(f"| {task} | {d} | {arm.lr:g} | {size:,.0f} | {size / ref_bytes:.3f} | {fmt(psi)} | "
                         f"{fmt(finals)} | {mean_spread(finals)[0] - ref_final:+.4f} |")
            figures[f"{task}/{d}"] = {"lr": arm.lr, "bytes": size, "psi": psi, "finals": finals}
        png, rel = study.plot_path(f"{NAME}-{task}")
        plot_curves(png, {d: [r.curve(0, metric) for r in arm.runs] for d, arm in results.items()},
                    f"validation {metric}", f"{NAME}: {task}, replica 0")
        plots.append(f"![{task}]({rel})")
    body = (preamble(NAME, study, __doc__) + "\n".join(lines) + "\n\n" + " ".join(plots)
            + f"\n\nLearning-rate tuning: {tuning_text(tuning)}.\n")
    def versus(t: str) -> str:
        f, ref = figures[f"{t}/int8"], figures[f"{t}/fp32"]
        change = mean_spread(f["finals"])[0] - mean_spread(ref["finals"])[0]
        return f"{t}: {f['bytes'] / ref['bytes']:.2f}× the bytes, final {change:+.4f}"

    summary = [("beyond the paper: compressed versions (int8 vs fp32)", "not in the paper",
                "; ".join(versus(t) for t in ("lm", "movielens")))]
    return Section(NAME, "Beyond the paper: compressed versions (compression)", body, figures, summary)
