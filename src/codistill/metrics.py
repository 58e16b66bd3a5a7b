"""Evaluation (per replica, ensemble, churn), metric files (JSONL + TensorBoard), steps-to-target."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .teachers import call_model


@torch.no_grad()
def evaluate_replicas(
    models: list[nn.Module], batches: Iterable[tuple[Any, torch.Tensor]]
) -> dict[str, Any]:
    """Validation cross entropy and accuracy of each model, their ensemble, and churn.

    The ensemble averages the models' predicted probabilities. Churn between two models is
    the mean total-variation distance of their predicted distributions (for two classes, the
    mean absolute difference of the predicted probability) and the fraction of positions
    whose top-1 prediction differs; with more than two models it is averaged over pairs.
    """
    n = len(models)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    nll = [0.0] * n
    correct = [0] * n
    ens_nll, ens_correct, count = 0.0, 0, 0
    pairs = list(itertools.combinations(range(n), 2))
    tv = dict.fromkeys(pairs, 0.0)
    disagree = dict.fromkeys(pairs, 0)
    for inputs, targets in batches:
        t = targets.reshape(-1)
        logps = [torch.log_softmax(call_model(m, inputs).float(), -1).reshape(t.numel(), -1)
                 for m in models]
        tops = [lp.argmax(-1) for lp in logps]
        for i, lp in enumerate(logps):
            nll[i] += float(-lp.gather(1, t[:, None]).sum())
            correct[i] += int((tops[i] == t).sum())
        if n > 1:
            ens = torch.logsumexp(torch.stack(logps), 0) - math.log(n)
            ens_nll += float(-ens.gather(1, t[:, None]).sum())
            ens_correct += int((ens.argmax(-1) == t).sum())
            for i, j in pairs:
                tv[(i, j)] += float(0.5 * (logps[i].exp() - logps[j].exp()).abs().sum())
                disagree[(i, j)] += int((tops[i] != tops[j]).sum())
        count += t.numel()
    for m, w in zip(models, was_training):
        m.train(w)
    if count == 0:
        raise ValueError("evaluation got no batches")
    out: dict[str, Any] = {
        "loss": [x / count for x in nll],
        "acc": [c / count for c in correct],
        "count": count,
    }
    if n > 1:
        out["ensemble_loss"] = ens_nll / count
        out["ensemble_acc"] = ens_correct / count
        out["churn_prob"] = sum(tv.values()) / count / len(pairs)
        out["churn_top1"] = sum(disagree.values()) / count / len(pairs)
    return out


class RunDirError(ValueError):
    """The run directory already holds another run's metrics."""


class MetricsWriter:
    """Writes metric rows to ``RUN_DIR/metrics.jsonl`` and mirrors them to TensorBoard.

    An existing metrics file is an error unless ``overwrite`` (start afresh) or
    ``resume_step`` (keep the rows up to that step, drop later ones, which the resumed run
    writes again) is given, so one run's metrics are never mixed into another's.
    """

    def __init__(self, run_dir: str, filename: str = "metrics.jsonl", tensorboard: bool = True,
                 tb_subdir: str = "", overwrite: bool = False, resume_step: int | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, filename)
        tb_dir = os.path.join(run_dir, "tensorboard", tb_subdir)
        if os.path.exists(self.path):
            if resume_step is not None:
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                tmp = f"{self.path}.tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(tmp, self.path)
            elif overwrite:
                os.remove(self.path)
                shutil.rmtree(tb_dir, ignore_errors=True)
            else:
                raise RunDirError(f"{self.path} already holds a run's metrics: pass --overwrite to "
                                  "replace them, --resume to continue, or choose another --out")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(tb_dir, purge_step=purge)

    def write(self, row: dict[str, Any]) -> None:
        """Write one row: ``step``, ``kind`` (train/eval/ensemble/churn), ``replica`` and values."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is None:
            return
        who = row.get("replica")
        suffix = f"/replica{who}" if isinstance(who, int) else ""
        for key, value in row.items():
            if key in ("step", "replica", "kind") or not isinstance(value, (int, float)):
                continue
            if isinstance(value, bool):
                continue
            self._tb.add_scalar(f"{row['kind']}/{key}{suffix}", value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL file (or of every ``metrics*.jsonl`` in a run directory)."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.startswith("metrics") and f.endswith(".jsonl"))
        if not files:
            raise FileNotFoundError(f"{path}: no metrics*.jsonl in this run directory")
        return [r for f in files for r in read_metrics(os.path.join(path, f))]
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON row ({e.msg})") from e
    return rows


def eval_curve(rows: list[dict[str, Any]], replica: int | str, key: str = "loss") -> list[tuple[int, float]]:
    """``[(step, value)]`` of eval rows for one replica (or ``"ensemble"``), by step."""
    kind = "ensemble" if replica == "ensemble" else "eval"
    pts = {r["step"]: r[key] for r in rows
           if r.get("kind") == kind and r.get("replica") == replica and key in r}
    return sorted(pts.items())


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose loss is at or below ``target``; None if never."""
    for step, value in curve:
        if value <= target:
            return step
    return None
