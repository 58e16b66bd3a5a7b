"""Data shards across replicas and the resumable shard sampler."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from codistill import ReplicaSampler, shard_dataset
from codistill.data import ShardSampler, shard_indices


@pytest.mark.parametrize("n,num_shards", [(10, 2), (101, 3), (7, 7), (1000, 4), (5, 1), (3, 5), (64, 8)])
def test_disjoint_shards_partition_the_data(n, num_shards):
    shards = [shard_indices(n, num_shards, s, seed=3) for s in range(num_shards)]
    for a, b in itertools.combinations(shards, 2):
        assert np.intersect1d(a, b).size == 0
    together = np.sort(np.concatenate(shards))
    assert np.array_equal(together, np.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for s in shards:
        assert s.dtype == np.int64 and np.array_equal(s, np.sort(s))


def test_disjoint_shards_depend_on_the_seed_only():
    a = shard_indices(1000, 2, 0, seed=1)
    assert np.array_equal(a, shard_indices(1000, 2, 0, seed=1))
    assert not np.array_equal(a, shard_indices(1000, 2, 0, seed=2))
    # A random partition, not contiguous halves or even/odd positions.
    assert not np.array_equal(a, np.arange(500)) and not np.array_equal(a, np.arange(0, 1000, 2))


def test_shared_gives_every_shard_all_the_data():
    for s in range(3):
        assert np.array_equal(shard_indices(50, 3, s, mode="shared"), np.arange(50))


@pytest.mark.parametrize("num_shards,shard", [(2, 2), (2, -1), (0, 0), (3, 7)])
def test_bad_shard_index_raises(num_shards, shard):
    with pytest.raises(ValueError, match="shard"):
        shard_indices(10, num_shards, shard)


def test_bad_shard_mode_raises():
    with pytest.raises(ValueError, match="disjoint"):
        shard_indices(10, 2, 0, mode="overlapping")


def _take(sampler: ShardSampler, k: int) -> list[np.ndarray]:
    return [sampler.next_batch().copy() for _ in range(k)]


def test_sampler_visits_every_index_once_per_epoch():
    idx = shard_indices(120, 2, 1, seed=0)  # 60 examples, 6 batches of 10
    sampler = ShardSampler(idx, batch_size=10, seed=5)
    epochs = [np.concatenate(_take(sampler, 6)) for _ in range(3)]
    for e in epochs:
        assert len(e) == 60 and np.array_equal(np.sort(e), idx)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert sampler.epoch == 2


def test_sampler_drops_the_ragged_tail_without_repeats():
    idx = np.arange(100, 123)  # 23 examples, batches of 5: 4 per epoch, 3 left out
    sampler = ShardSampler(idx, batch_size=5, seed=0)
    for _ in range(3):
        epoch = np.concatenate(_take(sampler, 4))
        assert len(np.unique(epoch)) == 20 and set(epoch) <= set(idx)
    assert all(len(b) == 5 for b in _take(sampler, 10))


@pytest.mark.parametrize("before", [0, 1, 5, 6, 7, 13])
def test_sampler_resume_gives_the_identical_continuation(before):
    idx = shard_indices(200, 3, 0, seed=1)  # 67 examples, 6 batches of 11 per epoch
    a = ShardSampler(idx, batch_size=11, seed=9)
    _take(a, before)
    state = a.state()
    b = ShardSampler(idx, batch_size=11, seed=9)
    b.load_state(dict(state))
    rest_a, rest_b = _take(a, 15), _take(b, 15)
    for x, y in zip(rest_a, rest_b):
        assert np.array_equal(x, y)
    assert a.state() == b.state()


def test_sampler_seed_changes_the_order():
    idx = np.arange(40)
    a = np.concatenate(_take(ShardSampler(idx, 8, seed=1), 5))
    b = np.concatenate(_take(ShardSampler(idx, 8, seed=2), 5))
    assert not np.array_equal(a, b) and np.array_equal(np.sort(a), np.sort(b))


def test_sampler_shard_smaller_than_a_batch_raises():
    with pytest.raises(ValueError, match="smaller than one batch"):
        ShardSampler(np.arange(3), batch_size=4, seed=0)


# --- shard_dataset / ReplicaSampler: users' own scripts -------------------------------------


class _Numbers(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("n,replicas,workers", [(100, 2, 1), (101, 3, 2), (50, 2, 4), (7, 1, 3)])
def test_shard_dataset_is_disjoint_by_replica_and_covers_the_data(n, replicas, workers):
    parts = {(r, w): [x for x in shard_dataset(_Numbers(n), r, replicas, worker=w, num_workers=workers,
                                                 seed=5)]
             for r in range(replicas) for w in range(workers)}
    per_replica = [set().union(*(parts[r, w] for w in range(workers))) for r in range(replicas)]
    for a, b in itertools.combinations(per_replica, 2):
        assert not a & b
    assert set().union(*per_replica) == set(range(n))
    for r in range(replicas):  # workers: equal sizes, overlapping only in the < W padded examples
        sizes = {len(parts[r, w]) for w in range(workers)}
        assert len(sizes) == 1
        total = sum(len(parts[r, w]) for w in range(workers))
        assert total - len(per_replica[r]) < workers


def test_shard_dataset_workers_split_their_replicas_shard():
    shard = set(shard_indices(40, 2, 1, seed=0).tolist())
    halves = [set(shard_dataset(_Numbers(40), 1, 2, worker=w, num_workers=2).indices) for w in range(2)]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == shard
    uneven = [shard_dataset(_Numbers(41), 0, 2, worker=w, num_workers=2, even=False) for w in range(2)]
    assert {len(u) for u in uneven} == {10, 11}  # replica 0 has 21 examples


def test_shard_dataset_is_deterministic_and_shared_mode_gives_all():
    a = shard_dataset(_Numbers(60), 0, 2, seed=3).indices
    assert a == shard_dataset(_Numbers(60), 0, 2, seed=3).indices
    assert a != shard_dataset(_Numbers(60), 0, 2, seed=4).indices
    assert sorted(shard_dataset(_Numbers(60), 1, 2, mode="shared").indices) == list(range(60))


def test_shard_dataset_reads_the_launcher_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert len(shard_dataset(_Numbers(30))) == 30  # outside the launcher: everything
    monkeypatch.setenv("CODISTILL_REPLICA", "1")
    monkeypatch.setenv("CODISTILL_NUM_REPLICAS", "3")
    assert shard_dataset(_Numbers(30)).indices == shard_dataset(_Numbers(30), 1, 3).indices
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shard_dataset(_Numbers(30)).indices == shard_dataset(_Numbers(30), 1, 3, worker=1,
                                                                num_workers=2).indices


def test_replica_sampler_shuffles_its_part_per_epoch():
    sampler = ReplicaSampler(_Numbers(64), 0, 2, worker=1, num_workers=2, seed=7)
    part = shard_dataset(_Numbers(64), 0, 2, worker=1, num_workers=2, seed=7).indices
    first = list(sampler)
    assert len(sampler) == 16 and sorted(first) == sorted(part) and first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(part)
    loader = torch.utils.data.DataLoader(_Numbers(64), batch_size=4, sampler=sampler)
    assert sorted(torch.cat(list(loader)).tolist()) == sorted(part)
    assert list(ReplicaSampler(_Numbers(64), 0, 2, worker=1, num_workers=2, seed=7, shuffle=False)) == part


def test_bad_worker_raises():
    with pytest.raises(ValueError, match="worker must be in"):
        shard_dataset(_Numbers(10), 0, 2, worker=2, num_workers=2)
