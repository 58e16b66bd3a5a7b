"""The environment variables `codistill launch` gives every replica, and reading them (a leaf)."""

from __future__ import annotations

import os

ENV_REPLICA = "CODISTILL_REPLICA"  # this replica's index, 0..N-1
ENV_NUM_REPLICAS = "CODISTILL_NUM_REPLICAS"  # N
ENV_EXCHANGE = "CODISTILL_EXCHANGE"  # the exchange directory or URL
ENV_RESTART = "CODISTILL_RESTART"  # 0 on the first start, k on the k-th restart
# Passed on from the launcher's own environment when set (exchange/signing.py):
ENV_KEY = "CODISTILL_EXCHANGE_KEY"  # the key(s) every replica signs and verifies versions with
ENV_RUN_ID = "CODISTILL_RUN_ID"  # the run id written into every version


REPLICA_SEED_STRIDE = 1009  # seed + 1009·replica: the engine's model init uses the same offsets


def replica_seed(base: int, replica: int | None = None) -> int:
    """A seed of this replica's own, ``base + 1009·replica`` (``replica`` from the launcher's
    environment by default; replica 0, and a script run alone, keep ``base``). Seed each
    replica's model with it so that replicas do not start from identical weights."""
    return base + REPLICA_SEED_STRIDE * (replica_env()[0] if replica is None else replica)


def replica_env() -> tuple[int, int]:
    """``(replica, num_replicas)`` from the launcher's environment; ``(0, 1)`` outside it."""
    if ENV_REPLICA not in os.environ:
        return 0, 1
    return int(os.environ[ENV_REPLICA]), int(os.environ[ENV_NUM_REPLICAS])
