"""click-churn: claim 3, the paper's Table 1. Retrains of one recipe with different seeds
(init and data order; the validation rows stay fixed) predict differently; codistillation
should make them agree far more than a single model does, and more than an ensemble of two,
at single-model serving cost and equal or better log loss.

Arms, each retrained in pairs of seeds: a single model (N=1); an ensemble of two single
models; 2-way codistillation (each retrain serves its replica 0), with the replicas on
disjoint halves of the data (the paper's recipe for scaling) and on the same data (also
with α=2, a stronger pull toward the peer); label smoothing (N=1, ε tuned). Churn of a
pair = mean absolute difference of its two predicted click probabilities on the validation
rows.
"""

from __future__ import annotations

import logging
from typing import Any

from ..churn import churn_between
from .results import Section, plot_curves
from .study import TUNE_SEED, ArmResult, Study, fmt, make_config, mean_spread, preamble, tuning_text

log = logging.getLogger(__name__)

NAME = "click-churn"
DATASETS = ("movielens", "adult")
LR_GRID = (0.001, 0.002, 0.005, 0.01, 0.02)
SMOOTHING_GRID = (0.02, 0.05, 0.1, 0.2)
CODISTILL = "2-way codistillation"
PAPER = "Criteo: −35% vs a single model (≈0.029 → ≈0.019), below an ensemble of two"


def base_config(dataset: str, quick: bool) -> dict[str, Any]:
    """The recipe's click config (the README's configs/click.yaml; tiny when ``quick``)."""
    if quick:
        return {"task": "click", "steps": 40, "replicas": 1, "batch_size": 128, "log_every": 20,
                "model": {"name": "click", "embed_dim": 4, "hidden": [16]},
                "data": {"name": dataset, "val_fraction": 0.1},
                "optimizer": {"name": "adam", "lr": 0.002},
                "codistill": {"alpha": 1.0, "burn_in": 10, "exchange_every": 10},
                "eval": {"every": 20, "batch_size": 2000, "max_batches": 1}}
    return {"task": "click", "steps": 1000, "replicas": 1, "batch_size": 256, "log_every": 50,
            "model": {"name": "click", "embed_dim": 16, "hidden": [64, 32], "dropout": 0.1},
            "data": {"name": dataset, "val_fraction": 0.1},
            "optimizer": {"name": "adam", "lr": 0.002, "warmup": 50, "schedule": "cosine"},
            "codistill": {"alpha": 1.0, "burn_in": 200, "exchange_every": 50},
            "eval": {"every": 100, "batch_size": 2000}}


def _pairs(study: Study, base: dict[str, Any], name: str, seeds: list[int]) -> list[ArmResult]:
    return [study.run(make_config(base, {"seed": s, "name": f"{name}-seed{s}"})) for s in seeds]


def _churn_rows(groups: list[tuple[list[tuple[str, int]], list[tuple[str, int]]]]) -> dict[str, list[float]]:
    """Per retrain pair: the two predictors' mean log loss and AUC, and their churn."""
    out: dict[str, list[float]] = {"loss": [], "auc": [], "churn": []}
    for a, b in groups:
        res = churn_between([a, b], max_batches=None)
        out["loss"].append(sum(m["loss"] for m in res["models"]) / 2)
        out["auc"].append(sum(m["auc"] for m in res["models"]) / 2)
        out["churn"].append(res["churn_prob"])
    return out


def run_dataset(study: Study, dataset: str) -> tuple[str, dict[str, Any]]:
    """Tune, train and compare every arm on one data set; return markdown and figures."""
    base = base_config(dataset, study.quick)
    grid = LR_GRID[:2] if study.quick else LR_GRID
    smooth_grid = SMOOTHING_GRID[:2] if study.quick else SMOOTHING_GRID
    pre = f"{NAME}-{dataset}"
    tuning: dict[str, dict[float, float]] = {}
    single = dict(base, replicas=1)
    lr_single, tuning["single model lr"] = study.tune(single, "optimizer.lr", grid, TUNE_SEED,
                                                      f"{pre}-single")
    single = make_config(single, {"optimizer.lr": lr_single}).to_dict()
    eps, tuning["label smoothing ε"] = study.tune(single, "label_smoothing", smooth_grid, TUNE_SEED,
                                                 f"{pre}-smoothing")
    smooth = make_config(single, {"label_smoothing": eps}).to_dict()
    p = study.seeds
    pool = _pairs(study, single, f"{pre}-single", list(range(4 * p)))
    ls = _pairs(study, smooth, f"{pre}-smoothing", list(range(2 * p)))

    def served(runs: list[ArmResult], i: int, size: int = 1) -> list[tuple[str, int]]:
        return [(r.dir, 0) for r in runs[i:i + size]]  # replica 0 of each run

    def retrains(runs: list[ArmResult]) -> dict[str, list[float]]:
        return _churn_rows([(served(runs, 2 * i), served(runs, 2 * i + 1)) for i in range(p)])

    arms = {"single model": retrains(pool),
            "ensemble of two": _churn_rows([(served(pool, 4 * i, 2), served(pool, 4 * i + 2, 2))
                                            for i in range(p)])}
    curves = {"single model": [a.curve(0) for a in pool[: 2 * p]]}
    for shards, alpha in (("disjoint", 1.0), ("shared", 1.0), ("shared", 2.0)):
        arm = f"{CODISTILL}, {shards} data" + (f", α={alpha:g}" if alpha != 1.0 else "")
        codist = dict(base, replicas=2, data={**base["data"], "shards": shards},
                      codistill={**base["codistill"], "alpha": alpha})
        name = f"{pre}-codistill-{shards}" + (f"-alpha{alpha:g}" if alpha != 1.0 else "")
        lr, tuning[f"{arm} lr"] = study.tune(codist, "optimizer.lr", grid, TUNE_SEED, name)
        codist = make_config(codist, {"optimizer.lr": lr}).to_dict()
        co = _pairs(study, codist, name, list(range(2 * p)))
        arms[arm] = retrains(co)
        curves[f"{arm} (replica 0)"] = [a.curve(0) for a in co]
    arms[f"label smoothing ε={eps:g}"] = retrains(ls)
    curves[f"label smoothing ε={eps:g}"] = [a.curve(0) for a in ls]
    ref = mean_spread(arms["single model"]["churn"])[0]
    lines = ["| arm | serving cost | val log loss | AUC | churn between retrains | vs single model |",
             "|---|---|---|---|---|---|"]
    for arm, r in arms.items():
        rel = mean_spread(r["churn"])[0] / ref - 1 if ref else float("nan")
        cost = "2 models" if arm.startswith("ensemble") else "1 model"
        lines.append(f"| {arm} | {cost} | {fmt(r['loss'])} | {fmt(r['auc'])} | {fmt(r['churn'])} | "
                     f"{rel:+.0%} |")
    png, rel_png = study.plot_path(f"{pre}")
    plot_curves(png, curves, "validation log loss", f"{NAME}: {dataset}")
    tuned = (f"Tuned on seed {TUNE_SEED} by final validation log loss (label smoothing's ε at the "
             f"single model's lr): {tuning_text(tuning)}.")
    text = (f"### {dataset}\n\n" + "\n".join(lines) + f"\n\n{p} retrain pairs (seeds "
            f"{', '.join(f'{2 * i}/{2 * i + 1}' for i in range(p))}; the ensemble arm pairs "
            f"seeds {', '.join(f'{4 * i}+{4 * i + 1} / {4 * i + 2}+{4 * i + 3}' for i in range(p))}). "
            f"{tuned}\n\n![{dataset}]({rel_png})\n")
    figures = {arm: {k: mean_spread(v) for k, v in r.items()} | {"values": r} for arm, r in arms.items()}
    figures["tuning"] = tuning
    return text, figures


def run(study: Study) -> Section:
    """The click-churn recipe on MovieLens-100k and Adult."""
    texts, figures, summary = [], {}, []
    for dataset in DATASETS:
        text, figs = run_dataset(study, dataset)
        texts.append(text)
        figures[dataset] = figs
        single, loss_single = figs["single model"]["churn"][0], figs["single model"]["loss"][0]
        ens = figs["ensemble of two"]["churn"][0]
        parts = []
        for arm in (a for a in figs if a.startswith(CODISTILL)):
            co, loss = (figs[arm][k][0] for k in ("churn", "loss"))
            parts.append(f"{arm.removeprefix(CODISTILL + ', ')} {co / single - 1:+.0%} ({single:.4f} → "
                         f"{co:.4f}, log loss {loss_single:.4f} → {loss:.4f})")
        summary.append((f"3. churn between retrains ({dataset})", PAPER,
                        "; ".join(parts) + f"; ensemble of two {ens / single - 1:+.0%}"))
    body = preamble(NAME, study, __doc__) + "\n".join(texts)
    return Section(NAME, "Claim 3: reproducible predictions (click-churn)", body, figures, summary)
