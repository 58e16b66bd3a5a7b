"""Evaluation: per replica, ensemble and churn, of categorical or binary outputs (the run log
that records it is runlog.py)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .modules import call_model


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (ties count half); NaN if only one class is present."""
    scores, labels = scores.double().reshape(-1), labels.reshape(-1) > 0.5
    pos = int(labels.sum())
    neg = labels.numel() - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s = scores[order]
    # average rank of tied scores: rank = (first + last) / 2 over each run of equal values
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()
    ranks = ((last - counts.double() + 1 + last) / 2)[inverse]
    rank_sum = float(ranks[labels[order]].sum())
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def _binary_metrics(p: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    eps = 1e-7
    pc = p.clamp(eps, 1 - eps)
    loss = float(-(y * pc.log() + (1 - y) * (1 - pc).log()).mean())
    return {"loss": loss, "acc": float(((p > 0.5) == (y > 0.5)).double().mean()),
            "auc": roc_auc(p, y), "calibration": float(p.mean() / y.mean()) if y.sum() > 0 else float("nan")}


def _pairs_churn(probs: list[torch.Tensor], binary: bool) -> tuple[float, float]:
    """Mean over pairs of (mean total variation of predictions, top-1 disagreement), summed
    over examples (divide by the count)."""
    tv = top1 = 0.0
    pairs = list(itertools.combinations(range(len(probs)), 2))
    for i, j in pairs:
        if binary:
            tv += float((probs[i] - probs[j]).abs().sum())
            top1 += float(((probs[i] > 0.5) != (probs[j] > 0.5)).sum())
        else:
            tv += float(0.5 * (probs[i] - probs[j]).abs().sum())
            top1 += float((probs[i].argmax(-1) != probs[j].argmax(-1)).sum())
    return tv / len(pairs), top1 / len(pairs)


def ensemble_prediction(predictions: Sequence[torch.Tensor], binary: bool) -> torch.Tensor:
    """An ensemble's prediction: the mean of its models' predicted probabilities. Binary:
    ``predictions`` are probabilities (sigmoid) and their mean is returned; categorical: they
    are log-probabilities (log-softmax) and the log of the mean is returned (log-sum-exp)."""
    if binary:
        return torch.stack(list(predictions)).mean(0)
    return torch.logsumexp(torch.stack(list(predictions)), 0) - math.log(len(predictions))


@torch.no_grad()
def evaluate_models(
    models: list[nn.Module], batches: Iterable[tuple[Any, torch.Tensor]], output: str = "categorical",
    group: Any = None, uncounted: Sequence[tuple[Any, torch.Tensor]] = (),
) -> dict[str, Any]:
    """Validation metrics of each model, of their ensemble, and churn between them.

    ``output`` is the task's: ``categorical`` (cross entropy, accuracy) or ``binary`` (log
    loss, accuracy at 0.5, AUC, calibration = mean prediction / mean label). The ensemble
    averages the models' predicted probabilities (:func:`ensemble_prediction`). Churn
    between two models is the mean total-variation distance of their predicted distributions
    (for clicks: the mean absolute difference of the predicted probability) and the fraction
    of examples whose top-1 prediction differs; with more than two models it is averaged
    over pairs.

    Returns ``{"models": [metrics per model], "count": N}`` and, for several models,
    ``"ensemble"`` (its metrics) and ``"churn"`` (``churn_prob``, ``churn_top1``).

    ``group``: the ranks of one replica each evaluate their share of the batches and every
    rank gets the metrics of the whole set. ``uncounted``: batches run but not counted, so
    that every rank of a sharded model runs as many forward passes as the others.
    """
    if output not in ("categorical", "binary"):
        raise ValueError(f"output must be 'categorical' or 'binary', got {output!r}")
    n, binary = len(models), output == "binary"
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    nll, correct = [0.0] * n, [0] * n
    ens_nll, ens_correct, count, tv, top1 = 0.0, 0, 0, 0.0, 0.0
    probs_all: list[list[torch.Tensor]] = [[] for _ in range(n)]
    labels: list[torch.Tensor] = []
    for inputs, targets in batches:
        t = targets.reshape(-1)
        outs = [call_model(m, inputs).float() for m in models]
        if binary:
            probs = [torch.sigmoid(o.reshape(-1)) for o in outs]
            for i, p in enumerate(probs):
                probs_all[i].append(p.cpu())
            labels.append(t.float().cpu())
        else:
            logps = [torch.log_softmax(o, -1).reshape(t.numel(), -1) for o in outs]
            tops = [lp.argmax(-1) for lp in logps]
            for i, lp in enumerate(logps):
                nll[i] += float(-lp.gather(1, t[:, None]).sum())
                correct[i] += int((tops[i] == t).sum())
            probs = [lp.exp() for lp in logps]
            if n > 1:
                ens = ensemble_prediction(logps, binary=False)
                ens_nll += float(-ens.gather(1, t[:, None]).sum())
                ens_correct += int((ens.argmax(-1) == t).sum())
        if n > 1:
            b_tv, b_top1 = _pairs_churn(probs, binary)
            tv, top1 = tv + b_tv, top1 + b_top1
        count += t.numel()
    for inputs, _ in uncounted:
        for m in models:
            call_model(m, inputs)
    for m, w in zip(models, was_training):
        m.train(w)
    if group is not None:
        if binary:
            parts: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, ([torch.cat(p) if p else torch.empty(0) for p in probs_all],
                                           torch.cat(labels) if labels else torch.empty(0)), group=group)
            probs_all = [[part[0][i] for part in parts] for i in range(n)]
            labels = [part[1] for part in parts]
        sums = torch.tensor([*nll, *correct, ens_nll, ens_correct, count, tv, top1], dtype=torch.float64)
        dist.all_reduce(sums, group=group)
        got = sums.tolist()
        nll, correct = got[:n], [int(c) for c in got[n : 2 * n]]
        ens_nll, ens_correct, count, tv, top1 = got[2 * n :]
        count = int(count)
    if count == 0:
        raise ValueError("evaluation got no batches")
    out: dict[str, Any] = {"count": count}
    if binary:
        y = torch.cat(labels)
        ps = [torch.cat(p) for p in probs_all]
        out["models"] = [_binary_metrics(p, y) for p in ps]
        if n > 1:
            out["ensemble"] = _binary_metrics(ensemble_prediction(ps, binary=True), y)
    else:
        out["models"] = [{"loss": nll[i] / count, "acc": correct[i] / count} for i in range(n)]
        if n > 1:
            out["ensemble"] = {"loss": ens_nll / count, "acc": ens_correct / count}
    if n > 1:
        out["churn"] = {"churn_prob": tv / count, "churn_top1": top1 / count}
    return out
