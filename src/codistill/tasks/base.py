"""A task owns what differs between problems; everything else in codistill is task-agnostic.

A :class:`Task` gives the training examples (by index, so they can be sharded across
replicas and workers), the validation batches, the model built from a spec, the task loss
φ, the kind of output (which decides ψ and the metrics) and the predictions churn is
measured on. Built-in tasks: ``lm``, ``image``, ``click``; a config may name a task of its
own as ``task: package.module:Class``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.sharding import ShardSampler, StreamSampler, shard_indices
from ..losses import task_loss
from ..models import build_model
from ..settings import DataSettings, TaskSchema

Batch = tuple[Any, torch.Tensor]  # (model inputs: a tensor, a tuple or a dict; targets)


class Task(TaskSchema, ABC):
    """One problem: data, model, φ, output kind, metrics, predictions for churn.

    Subclasses set ``Data`` (the dataclass of the config's ``data:`` section, a subclass of
    :class:`DataSettings`), ``output`` (``"categorical"``: logits ``[..., C]`` with integer
    targets; ``"binary"``: one logit per example with 0/1 targets) and ``default_model``,
    and load their data in ``__init__`` (errors name the file or the ``data.*`` field). The
    data is a function of the ``data`` settings alone: retrains with another run seed see
    the same examples (their randomness comes from the generators the loop passes).
    """

    def __init__(self, data: DataSettings) -> None:
        self.data = data

    @property
    @abstractmethod
    def train_size(self) -> int:
        """Number of training examples (indices ``0..train_size-1``)."""

    @abstractmethod
    def train_batch(self, indices: np.ndarray, generator: torch.Generator, device: str) -> Batch:
        """The training examples at ``indices``; ``generator`` drives any augmentation."""

    @abstractmethod
    def val_batches(self, batch_size: int, max_batches: int, device: str) -> list[Batch]:
        """Fixed validation batches (all of the split when ``max_batches`` is 0, else an evenly
        spread subset of ``max_batches`` batches)."""

    def sampler(self, replica: int, num_replicas: int, worker: int, num_workers: int, batch_size: int,
                shard_seed: int, order_seed: int) -> ShardSampler | StreamSampler:
        """The sampler of one worker of one replica: its share of ``data.shards`` (a seeded
        random partition of the examples, by ``shard_seed``), split among the replica's workers,
        drawn in an order seeded by ``order_seed``."""
        shard = shard_indices(self.train_size, num_replicas, replica, shard_seed, self.data.shards)
        return ShardSampler(shard[worker::num_workers], batch_size, seed=order_seed)

    def model_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``spec`` completed with what the data decides (vocabulary, classes, fields)."""
        return dict(spec)

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        """A fresh model from a complete spec (as :meth:`model_spec` returns)."""
        return build_model(spec)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """φ, the task loss."""
        return task_loss(outputs, targets, self.output)

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Extra values computed from one model's evaluation (e.g. bits per byte)."""
        return {}


def spread_subset(n: int, batch_size: int, max_batches: int) -> np.ndarray:
    """Indices of the validation examples to evaluate: all, or an evenly spaced subset."""
    if max_batches and max_batches * batch_size < n:
        return np.linspace(0, n - 1, max_batches * batch_size).astype(np.int64)
    return np.arange(n, dtype=np.int64)
