"""A task of your own, trained by codistill without touching the library.

A Task says what differs between problems: the data (by index, so codistill can shard it
across replicas and workers), the model, the loss φ and the kind of output. This one
classifies points drawn from a mixture of Gaussians with a small MLP. Name it in a config
as ``task: examples/custom_task.py:BlobsTask`` (or ``task: mypackage.module:BlobsTask`` for an
importable module) and train it like any built-in task:

    codistill train examples/custom_task.yaml --out runs/blobs
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from codistill.config import DataSettings, setting
from codistill.tasks import Batch, Task
from codistill.tasks.base import spread_subset


@dataclass
class BlobsData(DataSettings):
    """The config's ``data:`` section for this task (validated like the built-in ones)."""

    examples: int = setting(20_000, gt=0)
    classes: int = setting(5, gt=1)
    dim: int = setting(16, gt=0)
    noise: float = setting(2.5, gt=0)


class BlobsTask(Task):
    Data = BlobsData
    output = "categorical"  # logits [B, classes], integer targets; ψ is KL toward the peers
    default_model = {"name": "mlp", "hidden": 64}
    data: BlobsData

    def __init__(self, data: BlobsData) -> None:
        super().__init__(data)
        rng = np.random.default_rng(12345)  # the problem itself does not change with the seed
        centres = rng.normal(size=(data.classes, data.dim)) * 2
        y = rng.integers(0, data.classes, size=data.examples)
        x = centres[y] + rng.normal(size=(data.examples, data.dim)) * data.noise
        n_val = data.examples // 10
        self.x = torch.tensor(x, dtype=torch.float32)
        self.y = torch.tensor(y, dtype=torch.int64)
        self.val_x, self.val_y = self.x[:n_val], self.y[:n_val]
        self.train_x, self.train_y = self.x[n_val:], self.y[n_val:]

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    def train_batch(self, indices: np.ndarray, generator: torch.Generator, device: str) -> Batch:
        idx = torch.from_numpy(np.asarray(indices))
        return self.train_x[idx].to(device), self.train_y[idx].to(device)

    def val_batches(self, batch_size: int, max_batches: int, device: str) -> list[Batch]:
        idx = torch.from_numpy(spread_subset(len(self.val_y), batch_size, max_batches))
        return [(self.val_x[i].to(device), self.val_y[i].to(device)) for i in idx.split(batch_size)]

    def model_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {**spec, "dim": self.data.dim, "classes": self.data.classes}

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return nn.Sequential(nn.Linear(spec["dim"], spec["hidden"]), nn.ReLU(),
                             nn.Linear(spec["hidden"], spec["classes"]))
