"""ablations: claim 2 — what codistillation's gain depends on. From a reference 2-way
codistillation arm, change one thing at a time: the replicas' data (disjoint halves vs the
same data), label smoothing instead of a peer (N=1), the exchange interval K (staleness),
the number of replicas N, burn-in, α and the temperature. Every arm's learning rate is
tuned on one grid with the tuning seed; figures are replica 0's final validation loss over
the reported seeds, against the single model (N=1) and the reference, and the churn between
the retrains of each arm (replica 0, every pair of seeds). With K equal to the
step budget no exchange ever happens, so that arm is two independent replicas.
"""

from __future__ import annotations

import itertools
from typing import Any

from ..churn import churn_between
from .click_churn import LR_GRID, SMOOTHING_GRID, base_config
from .results import Section, plot_curves
from .study import TUNE_SEED, ArmResult, Study, fmt, make_config, mean_spread, preamble, tuning_text

NAME = "ablations"
DATASET = "movielens"
PAPER = "disjoint data beats shared; not explained by label smoothing; K of 50+ steps barely hurts"


def arms(quick: bool) -> dict[str, dict[str, Any]]:
    """The arms as changes to the reference (2 replicas, disjoint data, K=50, burn-in, α=1, T=1)."""
    ks = (1, 20) if quick else (1, 250, 1000)
    ns = (3,) if quick else (3, 4)
    return {
        "single model (N=1)": {"replicas": 1},
        "reference: N=2, disjoint data": {},
        "same data (shared)": {"data.shards": "shared"},
        "label smoothing instead (N=1)": {"replicas": 1, "label_smoothing": None},
        **{f"K={k}": {"codistill.exchange_every": k} for k in ks},
        **{f"N={n}": {"replicas": n} for n in ns},
        "no burn-in": {"codistill.burn_in": 0},
        "α=0.5": {"codistill.alpha": 0.5},
        "α=2": {"codistill.alpha": 2.0},
        "temperature 2": {"codistill.temperature": 2.0},
    }


def run(study: Study) -> Section:
    """The ablations on MovieLens-100k clicks."""
    base = dict(base_config(DATASET, study.quick), replicas=2)
    ref_k = base["codistill"]["exchange_every"]
    grid = LR_GRID[2:4] if study.quick else LR_GRID
    seeds = list(range(study.seeds))
    results: dict[str, list[ArmResult]] = {}
    tuning: dict[str, dict[float, float]] = {}
    chosen: dict[str, str] = {}
    for label, sets in arms(study.quick).items():
        name = f"{NAME}-{DATASET}-" + "".join(c if c.isalnum() else "_" for c in label)[:40]
        cfg = make_config(base, {k: v for k, v in sets.items() if v is not None}).to_dict()
        lr, tuning[f"{label} lr"] = study.tune(cfg, "optimizer.lr", grid, TUNE_SEED, name)
        cfg = make_config(cfg, {"optimizer.lr": lr}).to_dict()
        chosen[label] = f"lr {lr:g}"
        if "label_smoothing" in sets:  # ε tuned like the learning rate, at the tuned lr
            eps, tuning[f"{label} ε"] = study.tune(cfg, "label_smoothing", SMOOTHING_GRID, TUNE_SEED, name)
            cfg = make_config(cfg, {"label_smoothing": eps}).to_dict()
            chosen[label] += f", ε {eps:g}"
        results[label] = [study.run(make_config(cfg, {"seed": s, "name": f"{name}-seed{s}"})) for s in seeds]
    finals = {label: [r.final(0) for r in runs] for label, runs in results.items()}
    churn = {label: [churn_between([(a.dir, 0), (b.dir, 0)])["churn_prob"]
                     for a, b in itertools.combinations(runs, 2)] for label, runs in results.items()}
    single = mean_spread(finals["single model (N=1)"])[0]
    ref = mean_spread(finals["reference: N=2, disjoint data"])[0]
    lines = ["| arm | tuned | final val log loss (replica 0) | vs single model | vs reference "
             "| churn between retrains (every seed pair) |", "|---|---|---|---|---|---|"]
    for label, vals in finals.items():
        m = mean_spread(vals)[0]
        lines.append(f"| {label} | {chosen[label]} | {fmt(vals)} | {m - single:+.4f} | {m - ref:+.4f} "
                     f"| {fmt(churn[label])} |")
    png, rel = study.plot_path(NAME)
    keep = ("single model (N=1)", "reference: N=2, disjoint data", "same data (shared)",
            "label smoothing instead (N=1)")
    plot_curves(png, {label: [r.curve(0) for r in results[label]] for label in keep},
                "validation log loss", f"{NAME}: {DATASET}")
    shared = mean_spread(finals["same data (shared)"])[0]
    smooth = mean_spread(finals["label smoothing instead (N=1)"])[0]
    body = (preamble(NAME, study, __doc__) + "Data: "
            f"{DATASET} clicks; reference K={ref_k}, burn-in {base['codistill']['burn_in']}, "
            f"{base['steps']} steps of batch {base['batch_size']}.\n\n" + "\n".join(lines)
            + f"\n\n![ablations]({rel})\n\nTuning on seed {TUNE_SEED}: {tuning_text(tuning)}.\n")
    summary = [("2. ablations (" + DATASET + ")", PAPER,
                f"disjoint − shared {ref - shared:+.4f}; reference − label smoothing {ref - smooth:+.4f}; "
                f"reference − single {ref - single:+.4f} (log loss, lower is better)")]
    figures = {"finals": finals, "churn": churn, "tuning": tuning, "chosen": chosen}
    return Section(NAME, "Claim 2: what the gain depends on (ablations)", body, figures, summary)
