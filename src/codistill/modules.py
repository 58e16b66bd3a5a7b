"""Calling a model and reading what it predicts: the model inside DDP wrappers, a call on
tensor / tuple / dict inputs, the prediction in its output and that prediction as logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers (other modules are returned as they are)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(module, (DistributedDataParallel, DataParallel)):
        module = module.module
    return module


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` on a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def prediction(output: Any) -> torch.Tensor:
    """The prediction in a model's output: a tensor as it is, the first element of a tuple
    or list, the ``logits`` of a mapping or of an object that has them (Hugging Face model
    outputs), else a mapping's first value."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output:
        return prediction(output[0])
    if isinstance(output, dict) and output:
        return prediction(output["logits"] if "logits" in output else next(iter(output.values())))
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    raise TypeError(f"no prediction found in a model output of type {type(output).__name__}: pass "
                    "teachers=TeacherSpec(forward=lambda module, inputs: <the logits>) to the Codistiller")


def as_logits(pred: torch.Tensor, predictions: str, kind: str) -> torch.Tensor:
    """``pred`` (what a model predicts: ``logits``, ``log_probs`` or ``probs``) as logits of
    the same distribution (for ``bce``: of the positive class)."""
    if predictions == "logits" or (predictions == "log_probs" and kind != "bce"):
        return pred  # log-probabilities are logits of the same softmax
    tiny = torch.finfo(torch.float32).tiny
    if predictions == "log_probs":  # binary: log p -> log p - log(1 - p)
        return pred - torch.log1p(-pred.exp().clamp(max=1 - 1e-7))
    p = pred.float().clamp(tiny, 1.0)
    if kind == "bce":
        p = p.clamp(max=1 - 1e-7)
        return (p.log() - torch.log1p(-p)).to(pred.dtype)
    return p.log().to(pred.dtype)
