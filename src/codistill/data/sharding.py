"""Disjoint (or shared) data shards for replicas, and worker slices inside a replica.

``shard_dataset`` and ``ReplicaSampler`` are for users' own scripts: they read the replica
from ``codistill launch``'s environment and the worker from torch.distributed by default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset

from ..env import replica_env


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


def stream_shard(n: int, num_shards: int, shard: int, mode: str = "disjoint") -> tuple[int, int]:
    """(first, count) of the contiguous block of items ``0..n-1`` given to ``shard`` (every
    item with ``shared``). For streams whose order is already a fixed shuffle (a corpus of
    documents in hash order), where a random partition would cost a pass over all of it."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    if mode == "shared":
        return 0, n
    if mode != "disjoint":
        raise ValueError(f"data.shards must be 'disjoint' or 'shared', got {mode!r}")
    first = n * shard // num_shards
    return first, n * (shard + 1) // num_shards - first


class StreamSampler:
    """Batches of items from the block ``[first, first + count)`` with no item drawn twice
    until all were, in a seeded order that costs no memory: the ``p``-th item drawn is
    ``first + (a·p + c) mod count`` with ``a`` coprime to ``count``. Its position is one
    number, so ``state()``/``load_state()`` resume exactly. After ``count`` items (an epoch)
    a new ``(a, c)`` is drawn, and :attr:`epoch` says items now repeat."""

    def __init__(self, first: int, count: int, batch_size: int, seed: int) -> None:
        if count < batch_size:
            raise ValueError(f"a shard of {count} items is smaller than one batch ({batch_size})")
        if count >= 2**31:
            raise ValueError(f"a shard of {count} items is too large for StreamSampler (at most 2**31 - 1)")
        self.first, self.count, self.batch_size, self.seed = first, count, batch_size, seed
        self.epoch = 0
        self.offset = 0
        self._order()

    def _order(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        a = int(rng.integers(1, max(2, self.count)))
        while math.gcd(a, self.count) != 1:
            a = a % (self.count - 1) + 1
        self._a, self._c = a, int(rng.integers(0, self.count))

    def next_batch(self) -> np.ndarray:
        if self.offset + self.batch_size > self.count:  # drop the ragged tail
            self.epoch += 1
            self.offset = 0
            self._order()
        p = np.arange(self.offset, self.offset + self.batch_size, dtype=np.int64)
        self.offset += self.batch_size
        # (a·p + c) mod count without int64 overflow: a, p < count < 2**31 keeps a·p < 2**62.
        return self.first + (self._a * p + self._c) % self.count

    @property
    def drawn(self) -> int:
        """Items drawn so far (counting earlier epochs)."""
        return self.epoch * (self.count - self.count % self.batch_size) + self.offset

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order()


def _worker_env() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or of torchrun's environment before it starts."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def replica_indices(n: int, replica: int | None = None, num_replicas: int | None = None,
                    worker: int | None = None, num_workers: int | None = None, seed: int = 0,
                    mode: str = "disjoint", even: bool = True, contiguous: bool = False) -> np.ndarray:
    """Indices of ``0..n-1`` for one worker of one replica.

    ``contiguous``: one contiguous block per replica (in order; every index with ``shared``)
    and a contiguous block of it per worker, for a token stream cut into sequences after
    sharding; ``even`` then gives every worker the same number, dropping at most
    ``num_workers - 1`` trailing indices of the replica's block.

    Replicas get ``shard_indices`` (disjoint and together covering the data, or ``shared``);
    a replica's shard is split among its workers. ``even``: pad the shard with its first
    indices to a multiple of ``num_workers`` so every worker takes the same number of steps
    under DDP (as ``DistributedSampler`` does); else worker sizes differ by at most one.
    ``None`` reads the replica from ``codistill launch``'s environment (replica 0 of 1
    outside it) and the worker from torch.distributed (``RANK``/``WORLD_SIZE``): right when
    each replica is its own torch.distributed world, as under ``codistill launch``.
    """
    if replica is None or num_replicas is None:
        env_replica, env_num = replica_env()
        replica = env_replica if replica is None else replica
        num_replicas = env_num if num_replicas is None else num_replicas
    if worker is None or num_workers is None:
        env_worker, env_workers = _worker_env()
        worker = env_worker if worker is None else worker
        num_workers = env_workers if num_workers is None else num_workers
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, {num_workers}), got {worker}")
    if contiguous:
        first, count = stream_shard(n, num_replicas, replica, mode)
        if even:
            size = count // num_workers
            return np.arange(first + worker * size, first + (worker + 1) * size, dtype=np.int64)
        sub, count = stream_shard(count, num_workers, worker)
        return np.arange(first + sub, first + sub + count, dtype=np.int64)
    shard = shard_indices(n, num_replicas, replica, seed=seed, mode=mode)
    if even and len(shard) % num_workers:
        pad = num_workers - len(shard) % num_workers
        shard = np.concatenate([shard, np.resize(shard, pad)])
    return shard[worker::num_workers]


def shard_dataset(dataset: Dataset | torch.Tensor, replica: int | None = None,
                  num_replicas: int | None = None, *, worker: int | None = None,
                  num_workers: int | None = None, seed: int = 0, mode: str = "disjoint", even: bool = True,
                  contiguous: bool = False) -> Subset | torch.Tensor:
    """This worker's part of a map-style ``dataset`` (see ``replica_indices``), as a ``Subset``.

    Use it with an ordinary ``DataLoader(..., shuffle=True)`` and no ``DistributedSampler``.
    ``contiguous=True`` keeps order: each replica one contiguous part, each worker a
    contiguous part of that — for a token stream (a 1-D tensor of token ids, for which the
    part itself, a view, is returned), where the default's random positions would cut the
    text apart.
    """
    idx = replica_indices(len(dataset), replica, num_replicas, worker, num_workers, seed, mode, even,
                          contiguous)
    if contiguous and isinstance(dataset, torch.Tensor):
        return dataset[int(idx[0]) : int(idx[-1]) + 1] if len(idx) else dataset[:0]
    return Subset(dataset, idx.tolist())


class ReplicaSampler(Sampler[int]):
    """A sampler over this worker's part of ``dataset`` (see ``replica_indices``), shuffled
    per epoch by ``(seed, epoch)``; call ``set_epoch`` as with ``DistributedSampler``."""

    def __init__(self, dataset: Sized, replica: int | None = None, num_replicas: int | None = None, *,
                 worker: int | None = None, num_workers: int | None = None, seed: int = 0,
                 mode: str = "disjoint", even: bool = True, shuffle: bool = True) -> None:
        self.indices = replica_indices(len(dataset), replica, num_replicas, worker, num_workers, seed,
                                       mode, even)
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        return iter(order.tolist())

    def __len__(self) -> int:
        return len(self.indices)
