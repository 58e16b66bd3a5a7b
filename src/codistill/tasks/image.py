"""Image classification: Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.images import augment, load_fashion_mnist, to_float
from ..settings import DataSettings, setting
from .base import Batch, Task, spread_subset


@dataclass
class ImageData(DataSettings):
    name: str = setting("fashion-mnist", choices=("fashion-mnist",))
    dir: str | None = None  # a directory with the four IDX files (default: found by the set-up step)
    augment: bool = True  # random crop (after zero padding) + horizontal flip, per batch
    pad: int = setting(2, ge=0)
    max_train: int | None = setting(None, gt=0)  # use only the first training images (quick runs)


class ImageTask(Task):
    """Ten-class classification of 28×28 grey images; validation on the 10,000 test images."""

    Data = ImageData
    output = "categorical"
    default_model = {"name": "cnn", "width": 16, "hidden": 64}
    data: ImageData

    def __init__(self, data: ImageData) -> None:
        super().__init__(data)
        d = load_fashion_mnist(data.dir)
        n = data.max_train or len(d["train_y"])
        self.train_x = torch.from_numpy(d["train_x"][:n])
        self.train_y = torch.from_numpy(d["train_y"][:n])
        self.val_x = torch.from_numpy(d["test_x"])
        self.val_y = torch.from_numpy(d["test_y"])
        self.num_classes = 10

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    def train_batch(self, indices: np.ndarray, generator: torch.Generator, device: str) -> Batch:
        idx = torch.from_numpy(np.asarray(indices))
        x = to_float(self.train_x[idx])
        if self.data.augment:
            x = augment(x, generator, pad=self.data.pad)
        return x.to(device), self.train_y[idx].to(device)

    def val_batches(self, batch_size: int, max_batches: int, device: str) -> list[Batch]:
        idx = torch.from_numpy(spread_subset(len(self.val_y), batch_size, max_batches))
        return [(to_float(self.val_x[i]).to(device), self.val_y[i].to(device))
                for i in idx.split(batch_size)]

    def model_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {**spec, "num_classes": self.num_classes, "in_channels": 1}
