"""Report over run directories: a PNG of validation loss against steps and a markdown table."""

from __future__ import annotations

import os
from typing import Any

import yaml

from ._extras import pyplot
from .runlog import eval_curve, read_metrics, steps_to_target

EXTRA_METRICS = {"bpb": "bits/byte", "acc": "acc", "auc": "AUC", "calibration": "calibration"}


def _run_info(run_dir: str) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    cfg_path = os.path.join(run_dir, "config.yaml")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    name = cfg.get("name") or os.path.basename(os.path.normpath(run_dir))
    replicas = sorted({r["replica"] for r in rows if r.get("kind") == "eval"})
    return {"dir": run_dir, "name": name, "rows": rows, "replicas": replicas, "config": cfg}


def default_target(runs: list[dict[str, Any]]) -> float | None:
    """The final validation loss of the baseline: the first run with one replica, else run 0."""
    base = next((r for r in runs if len(r["replicas"]) == 1), runs[0] if runs else None)
    if base is None or not base["replicas"]:
        return None
    curve = eval_curve(base["rows"], base["replicas"][0])
    return curve[-1][1] if curve else None


def make_report(run_dirs: list[str], out_dir: str, target: float | None = None) -> dict[str, str]:
    """Write ``report.png`` and ``report.md`` into ``out_dir``; return their paths."""
    plt = pyplot("the report's plot")

    runs = [_run_info(d) for d in run_dirs]
    if target is None:
        target = default_target(runs)
    os.makedirs(out_dir, exist_ok=True)

    fig, ax = plt.subplots(figsize=(8, 5))
    extras = [k for k in EXTRA_METRICS
              if any(k in r for run in runs for r in run["rows"] if r.get("kind") == "eval")]
    reach_head = f"steps to {target:.4f}" if target is not None else "steps to target"
    heads = ["run", "model", "final val loss", "best val loss",
             *(f"final {EXTRA_METRICS[k]}" for k in extras), reach_head, "churn (TV)", "top-1 disagreement"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for run in runs:
        rows = run["rows"]
        churn = [r for r in rows if r.get("kind") == "churn"]
        last_churn = max(churn, key=lambda r: r["step"]) if churn else None
        for who in run["replicas"] + (["ensemble"] if len(run["replicas"]) > 1 else []):
            curve = eval_curve(rows, who)
            if not curve:
                continue
            label = f"{run['name']} / {'ensemble' if who == 'ensemble' else f'replica {who}'}"
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=label,
                    linestyle="--" if who == "ensemble" else "-")
            last_step, last = curve[-1]
            extra_cells = [f"{dict(eval_curve(rows, who, k)).get(last_step, float('nan')):.4f}"
                           for k in extras]
            reach = steps_to_target(curve, target) if target is not None else None
            churn_cells = ([f"{last_churn['churn_prob']:.4f}", f"{last_churn['churn_top1']:.4f}"]
                           if last_churn and who == "ensemble" else ["–", "–"])
            cells = [run["name"], label.split(" / ")[1], f"{last:.4f}", f"{min(v for _, v in curve):.4f}",
                     *extra_cells, str(reach) if reach is not None else "not reached", *churn_cells]
            lines.append("| " + " | ".join(cells) + " |")
    if target is not None:
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"target {target:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (cross entropy / log loss, nats)")
    ax.set_title("codistill: validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    values = [v for run in runs for who in run["replicas"] for _, v in eval_curve(run["rows"], who)]
    if values:  # the first evaluations sit far above the rest; keep the interesting range
        lo = min(values)
        hi = sorted(values)[int(0.9 * (len(values) - 1))]
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    png = os.path.join(out_dir, "report.png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

    md = os.path.join(out_dir, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write("# codistill report\n\n")
        f.write(f"Runs: {', '.join(r['dir'] for r in runs)}\n\n")
        if target is not None:
            f.write(f"Target validation loss: {target:.4f} (steps to target = first evaluation "
                    "at or below it).\n\n")
        f.write("\n".join(lines) + "\n\n")
        f.write("Churn: mean total-variation distance between the replicas' predicted "
                "distributions (for clicks: mean absolute difference of the predicted probability), "
                "and the fraction of predictions whose top-1 class differs (last evaluation).\n\n"
                "![validation loss](report.png)\n")
    return {"png": png, "md": md}
