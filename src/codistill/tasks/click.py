"""Click prediction, the paper's Criteo setting at small scale: MovieLens-100k as clicks,
Adult census, a user's CSV/Parquet table, or a Criteo-shaped generator of any size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..data.tabular import (
    ClickTable,
    CriteoGenerator,
    MissingColumn,
    load_adult,
    load_movielens,
    load_table,
)
from ..models.click import ClickModel, code_range_error
from ..settings import ConfigError, DataSettings, setting
from .base import Batch, Task, spread_subset

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class ClickData(DataSettings):
    name: str = setting("movielens", choices=("movielens", "adult", "table", "criteo"))
    path: str | None = None  # movielens: a directory of ml-100k files; adult/table: the file
    # Column names and the positive label are strings even if YAML read them as numbers.
    label: str | None = setting(None, text=True)  # table: the 0/1 click column
    categorical: list[str] = setting([], text=True)  # table: categorical columns
    numeric: list[str] = setting([], text=True)  # table: numeric columns
    positive: str | None = setting(None, text=True)  # table: the label value that means a click
    min_count: int = setting(1, gt=0)  # rarer categories share the 'unknown' id 0
    val_fraction: float = setting(0.1, gt=0, lt=0.5)  # held-out rows (random, by split_seed)
    # The validation split and the generator's rows: fixed across retrains with other `seed`s
    # (which change the init and data order only), so their predictions can be compared.
    split_seed: int = setting(0, ge=0)
    rows: int = setting(1_000_000, gt=0)  # criteo: training rows streamed by the generator
    val_rows: int = setting(20_000, gt=0)  # criteo: validation rows
    buckets: int = setting(1000, gt=1)  # criteo: hash buckets per categorical field


class ClickTask(Task):
    """Binary click prediction: one logit per row, φ the logistic loss, ψ binary cross
    entropy toward the peers' averaged click probability; inputs ``(categorical, numeric)``."""

    Data = ClickData
    output = "binary"
    default_model = {"name": "click", "embed_dim": 8, "hidden": [64, 32]}
    data: ClickData

    def __init__(self, data: ClickData) -> None:
        super().__init__(data)
        self.generator: CriteoGenerator | None = None
        if data.name == "criteo":
            self.generator = CriteoGenerator(data.rows + data.val_rows, seed=data.split_seed,
                                             buckets=data.buckets)
            self.cardinalities = list(self.generator.cardinalities)
            self.fields = list(self.generator.categorical_names)
            self.code_max = [c - 1 for c in self.cardinalities]  # codes are hashes modulo the buckets
            sample = self.generator.batch(np.arange(min(data.rows, 20_000)))[1]
            self._fit_numeric(sample)
            cat, num, y = self.generator.batch(np.arange(data.rows, data.rows + data.val_rows))
            self.val = self._tensors(cat, num, y)
            return
        table = self._load_table(data)
        perm = np.random.default_rng(data.split_seed).permutation(len(table.labels))
        n_val = max(1, int(round(len(perm) * data.val_fraction)))
        val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        self.cardinalities = list(table.cardinalities)
        self.fields = list(table.categorical_names)
        # The largest code of each field (the table checked them all when it was made): what a
        # model's field sizes are checked against, once, in build_model.
        self.code_max = table.categorical.max(0).tolist() if len(table) and self.cardinalities else \
            [0] * len(self.cardinalities)
        self._fit_numeric(table.numeric[train])
        self.train = self._tensors(table.categorical[train], table.numeric[train], table.labels[train])
        self.val = self._tensors(table.categorical[val], table.numeric[val], table.labels[val])

    @staticmethod
    def _load_table(data: ClickData) -> ClickTable:
        if data.name == "movielens":
            return load_movielens(data.path, min_count=data.min_count)
        if data.name == "adult":
            return load_adult(data.path, min_count=data.min_count)
        if not data.path or not data.label:
            raise ConfigError("data.name 'table' needs data.path (a CSV or Parquet file) and data.label")
        try:
            return load_table(data.path, data.label, data.categorical, data.numeric,
                              min_count=data.min_count, positive=data.positive)
        except MissingColumn as e:
            raise ConfigError(f"data.{e.role}: {e}") from None

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        d = cfg.data
        if d.name == "table" and (not d.path or not d.label):
            raise ConfigError("data.name 'table' needs data.path (a CSV or Parquet file) and data.label")
        if d.name == "table" and not (d.categorical or d.numeric):
            raise ConfigError("data.name 'table' needs feature columns: data.categorical and/or "
                              "data.numeric (both are empty)")

    def _fit_numeric(self, train_numeric: np.ndarray) -> None:
        """Standardise numeric features with the training rows' statistics."""
        x = self._squash(train_numeric)
        self.mean = x.mean(0) if len(x) else np.zeros(x.shape[1], np.float32)
        self.std = np.where(x.std(0) > 1e-6, x.std(0), 1.0) if len(x) else np.ones(x.shape[1], np.float32)

    @staticmethod
    def _squash(x: np.ndarray) -> np.ndarray:
        # Long-tailed counts (Criteo-like) become usable features under a signed log.
        return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)

    def _tensors(self, cat: np.ndarray, num: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, ...]:
        num = (self._squash(num) - self.mean) / self.std
        return (torch.from_numpy(np.ascontiguousarray(cat, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(num, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)))

    @property
    def train_size(self) -> int:
        return self.data.rows if self.generator is not None else len(self.train[2])

    def train_batch(self, indices: np.ndarray, generator: torch.Generator, device: str) -> Batch:
        if self.generator is not None:
            cat, num, y = self._tensors(*self.generator.batch(np.asarray(indices)))
        else:
            idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
            cat, num, y = (t.index_select(0, idx) for t in self.train)  # 2× faster than t[idx] here
        return (cat.to(device), num.to(device)), y.to(device)

    def val_batches(self, batch_size: int, max_batches: int, device: str) -> list[Batch]:
        idx = torch.from_numpy(spread_subset(len(self.val[2]), batch_size, max_batches))
        return [((self.val[0][i].to(device), self.val[1][i].to(device)), self.val[2][i].to(device))
                for i in idx.split(batch_size)]

    def model_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {**spec, "cardinalities": self.cardinalities, "num_numeric": int(self.mean.shape[0])}

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        """The model of ``spec``. A :class:`ClickModel` has this task's data checked against its
        field sizes here, once (:meth:`check_model`), and then checks no inputs in its forward:
        no host synchronisation per batch, teachers included."""
        model = super().build_model(spec)
        if isinstance(model, ClickModel):
            self.check_model(model)
            model.validate_inputs = False  # every input it gets from this task was checked now
        return model

    def check_model(self, model: ClickModel) -> None:
        """ValueError unless every example of this task fits ``model``: as many categorical
        fields, each field's codes within the model's cardinality (naming the field, its
        largest code and the limit), as many numeric features."""
        cards, f, d = list(model.cardinalities), len(self.cardinalities), int(self.mean.shape[0])
        if len(cards) != f:
            raise ValueError(f"the model has {len(cards)} categorical fields (cardinalities {cards}); "
                             f"the data has {f} ({self.fields})")
        bad = code_range_error([0] * f, self.code_max, cards, self.fields)
        if bad:
            raise ValueError(f"the model's field sizes do not fit the data: categorical {bad}")
        if model.num_numeric != d:
            raise ValueError(f"the model takes {model.num_numeric} numeric features; the data has {d}")
