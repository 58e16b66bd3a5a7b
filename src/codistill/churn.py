"""Churn between retrains: how differently two independently trained runs predict.

The paper's reproducibility claim compares two *retrains* (different seeds) of the same
recipe: codistilled retrains should disagree far less than baseline retrains. Churn between
the replicas of one codistillation run is biased low (they are trained to agree); this
module compares the final weights of separate runs on the validation split.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import load_config
from .metrics import ensemble_prediction, evaluate_models
from .models import build_model
from .rundir import load_weights
from .tasks import build_task


def load_final_model(run_dir: str, replica: int = 0,
                     build: Callable[[dict[str, Any]], nn.Module] = build_model) -> nn.Module:
    """The final weights of ``replica`` in ``run_dir``, built (by ``build``) from the spec
    stored with them."""
    state, spec = load_weights(run_dir, replica)
    model = build(spec)
    model.load_state_dict(state)
    return model.eval()


class Ensemble(nn.Module):
    """Several models as one predictor: its outputs, read as logits, give the average of
    the models' predicted probabilities (softmax for classes, sigmoid for clicks;
    :func:`codistill.metrics.ensemble_prediction`)."""

    def __init__(self, models: list[nn.Module], output: str) -> None:
        super().__init__()
        self.members, self.output = nn.ModuleList(models), output

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        outs = [m(*args, **kwargs).float() for m in self.members]
        if self.output == "binary":
            p = ensemble_prediction([torch.sigmoid(o) for o in outs], binary=True).clamp(1e-7, 1 - 1e-7)
            return torch.log(p) - torch.log1p(-p)
        return ensemble_prediction([torch.log_softmax(o, -1) for o in outs], binary=False)


def churn_between(runs: list[tuple[str, int]] | list[list[tuple[str, int]]],
                  max_batches: int | None = None) -> dict[str, Any]:
    """Validation loss of each ``(run_dir, replica)`` and the churn among them.

    An entry may be a list of ``(run_dir, replica)``: their ensemble (averaged predicted
    probabilities) is one predictor, e.g. to compare the retrains of an ensemble of two.
    The data settings (and so the validation split) come from the first run's config.
    """
    groups = [g if isinstance(g, list) else [g] for g in runs]
    if len(groups) < 2:
        raise ValueError("churn needs at least two runs")
    cfg = load_config(os.path.join(groups[0][0][0], "config.yaml"))
    if max_batches is not None:
        cfg.eval.max_batches = max_batches
    task = build_task(cfg)
    members = [[load_final_model(d, r, task.build_model) for d, r in g] for g in groups]
    models = [Ensemble(m, task.output) if len(m) > 1 else m[0] for m in members]
    res = evaluate_models(models, task.val_batches(cfg.eval.batch_size, cfg.eval.max_batches, "cpu"),
                          task.output)
    names = ["+".join(f"{d}#replica-{r}" for d, r in g) for g in groups]
    return {"runs": names, "task": cfg.task,
            "models": res["models"], "loss": [m["loss"] for m in res["models"]], **res["churn"],
            "ensemble": res["ensemble"], "ensemble_loss": res["ensemble"]["loss"], "count": res["count"]}


def parse_run(spec: str) -> tuple[str, int]:
    """``RUN_DIR`` or ``RUN_DIR#R`` (replica R, default 0)."""
    path, _, replica = spec.partition("#")
    try:
        return path, int(replica) if replica else 0
    except ValueError:
        raise ValueError(f"{spec!r}: expected RUN_DIR or RUN_DIR#REPLICA") from None


__all__ = ["Ensemble", "churn_between", "load_final_model", "parse_run"]
