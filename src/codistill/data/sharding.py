"""Disjoint (or shared) data shards for replicas, and worker slices inside a replica."""

from __future__ import annotations

import numpy as np


def shard_indices(n: int, num_shards: int, shard: int, seed: int = 0, mode: str = "disjoint") -> np.ndarray:
    """Indices of examples ``0..n-1`` given to ``shard`` of ``num_shards``.

    ``disjoint``: a seeded random partition (shards do not overlap and together cover the
    data, sizes differ by at most one). ``shared``: every shard gets all the data.
    """
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    if mode == "shared":
        return np.arange(n, dtype=np.int64)
    if mode != "disjoint":
        raise ValueError(f"data.shards must be 'disjoint' or 'shared', got {mode!r}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[shard::num_shards]).astype(np.int64)


class ShardSampler:
    """Endless shuffled batches of indices from one shard, resumable from its position.

    Each epoch visits every index of the shard once in an order fixed by (seed, epoch);
    ``state()``/``load_state()`` capture the position so a resumed run repeats no data.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
        if len(indices) < batch_size:
            raise ValueError(
                f"a shard of {len(indices)} examples is smaller than one batch ({batch_size})"
            )
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        return self.indices[rng.permutation(len(self.indices))]

    def next_batch(self) -> np.ndarray:
        if self.offset + self.batch_size > len(self._order):  # drop the ragged tail
            self.epoch += 1
            self.offset = 0
            self._order = self._epoch_order()
        batch = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._epoch_order()
