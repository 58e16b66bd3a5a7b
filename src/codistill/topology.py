"""Ranks → (replica, worker), and one process group per replica.

In one-world mode the world of N×W ranks is split into N replicas of W consecutive ranks.
In one-job-per-replica mode the world is a single replica and the replica index comes from
the command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    num_replicas: int  # N in the whole codistillation run
    workers: int  # W, ranks per replica
    replica: int  # this rank's replica
    worker: int  # this rank's index inside its replica
    one_world: bool  # True when every replica lives in this torch.distributed world

    @property
    def is_leader(self) -> bool:
        """The replica's first rank: it publishes, checkpoints the model and writes metrics."""
        return self.worker == 0

    def replica_ranks(self, replica: int) -> list[int]:
        """Global ranks of ``replica`` (only meaningful for replicas in this world)."""
        base = replica * self.workers if self.one_world else 0
        return list(range(base, base + self.workers))

    def leader_rank(self, replica: int | None = None) -> int:
        return self.replica_ranks(self.replica if replica is None else replica)[0]


def make_topology(
    rank: int, world_size: int, num_replicas: int, replica: int | None = None
) -> Topology:
    """Place ``rank``: one world split into ``num_replicas`` replicas, or (``replica`` given)
    a world that is one replica of a larger run."""
    if num_replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {num_replicas}")
    if replica is not None:
        if not 0 <= replica < num_replicas:
            raise ValueError(f"--replica must be in [0, {num_replicas}), got {replica}")
        return Topology(rank, world_size, num_replicas, world_size, replica, rank, False)
    if world_size % num_replicas:
        raise ValueError(
            f"world size {world_size} is not divisible by replicas={num_replicas}: "
            "launch replicas × workers processes"
        )
    w = world_size // num_replicas
    return Topology(rank, world_size, num_replicas, w, rank // w, rank % w, True)


@dataclass
class Groups:
    replica: Any  # this rank's replica group (None: the default group / no distributed)
    leaders: Any  # the replicas' first ranks (one-world mode only)


def make_groups(topo: Topology, timeout: Any = None) -> Groups:
    """Create every replica group and the leaders group on every rank, in the same order
    (``timeout``: a ``timedelta`` after which their collectives fail)."""
    if not dist.is_initialized():
        return Groups(None, None)
    if not topo.one_world:
        return Groups(dist.group.WORLD, None)
    mine = None
    for r in range(topo.num_replicas):
        g = dist.new_group(topo.replica_ranks(r), timeout=timeout)
        if r == topo.replica:
            mine = g
    leaders = dist.new_group([topo.leader_rank(r) for r in range(topo.num_replicas)], timeout=timeout)
    return Groups(mine, leaders)


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (0, 1, 0 without it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))
