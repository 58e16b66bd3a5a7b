"""Distributed codistillation under torchrun: one training loop per rank.

Two launch modes:

* one world: ``torchrun --nproc-per-node=N*W -m codistill train CONFIG`` splits the world
  into N replicas of W ranks, each replica DDP over its own process group;
* one job per replica: ``codistill train CONFIG --replica R --num-replicas N --exchange DIR``
  (under torchrun for W > 1); replicas share only the exchange location.

This module only places this rank (topology, process groups, device) and handles torchrun's
plumbing (the process group, restarts); the run is assembled and trained by
:func:`codistill.run.run`, as the engine's, so with W=1, the same seeds and
``codistill.sync`` on, both paths give the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig
from .files import atomic_write
from .run import Placement, run, set_threads
from .topology import Topology, env_world, make_groups, make_topology

log = logging.getLogger(__name__)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``dist_timeout``: a rank stalled or died."""


def _restart_count() -> int:
    """This node's torchrun restart count (0 without torchrun). Only this node's: when another
    node's worker fails, torchrun restarts this node's workers without counting it."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _elastic_marker(out_dir: str, topo: Topology) -> tuple[str, bool]:
    """The file naming the torchrun job that owns ``out_dir`` (per replica job, or one for a
    one-world job) and whether this rank writes it."""
    if topo.one_world:
        return os.path.join(out_dir, ".elastic"), topo.rank == 0
    return os.path.join(out_dir, f".elastic-replica{topo.replica}"), topo.is_leader


def _elastic_restart(out_dir: str, topo: Topology, attempt: int) -> bool:
    """True on a torchrun restart (``attempt`` > 0, :func:`agree_attempt`) of a job whose
    earlier attempt started training in ``out_dir``: the run then resumes by itself. An
    attempt that was refused (an earlier run's files) never marked the directory, so its
    restart is refused too."""
    if not attempt:
        return False
    marker, _ = _elastic_marker(out_dir, topo)
    try:
        with open(marker, encoding="utf-8") as f:
            return f.read() == os.environ.get("TORCHELASTIC_RUN_ID", "")
    except FileNotFoundError:
        return False


def _unmark_elastic(out_dir: str, topo: Topology, attempt: int) -> None:
    """On a first attempt, remove a marker left by another job (it must not make a restart of
    this one resume); called once the run is to be trained, so a refused one changes nothing."""
    marker, writer = _elastic_marker(out_dir, topo)
    if writer and not attempt and os.path.exists(marker):
        os.remove(marker)


def _mark_elastic(out_dir: str, topo: Topology) -> None:
    marker, writer = _elastic_marker(out_dir, topo)
    if writer and "TORCHELASTIC_RUN_ID" in os.environ:
        atomic_write(marker, os.environ["TORCHELASTIC_RUN_ID"])


@contextlib.contextmanager
def _elastic_claim(out_dir: str, topo: Topology, attempt: int) -> Iterator[None]:
    """Around the taking of the run directory (its start-up checks): a stale marker goes
    first, this job's is written once the directory is this run's."""
    _unmark_elastic(out_dir, topo, attempt)
    yield
    _mark_elastic(out_dir, topo)


_ATTEMPT = "codistill/attempt"  # the name rank 0 gave the latest attempt, in torchrun's store


def agree_attempt(store: Any, rank: int, world: int, restarts: int, timeout: timedelta) -> tuple[str, int]:
    """``(name, number)`` of this attempt of a torchrun job, the same on every rank of every node.

    torchrun's store outlives an attempt (it still holds the previous attempt's addresses,
    which new ranks would connect to) and its restart count is per node (``restarts``: this
    rank's). So rank 0 names each attempt afresh and numbers it: the highest restart count of
    any rank, or the attempts it named in this store before. Every other rank joins the name
    it reads with a token of its own and takes it once rank 0 has acknowledged that token; a
    name left by the previous attempt's rank 0 is never acknowledged, so it waits for the new one.
    """
    if rank == 0:
        return _name_attempt(store, world, restarts)
    token, name = uuid.uuid4().hex, None
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        current = store.get(_ATTEMPT).decode()
        if current != name:
            name = current
            store.set(f"codistill/{name}/join/{rank}", f"{token} {restarts}")
        ack = f"codistill/{name}/ack/{token}"
        if store.check([ack]):
            return name, int(store.get(ack))
        time.sleep(0.05)
    raise CollectiveTimeout(f"rank {rank}: rank 0 of this torchrun attempt did not answer within "
                            f"dist_timeout={timeout.total_seconds():g}s")


def _name_attempt(store: Any, world: int, restarts: int) -> tuple[str, int]:
    """Rank 0's side of :func:`agree_attempt`."""
    name = uuid.uuid4().hex
    named_before = store.add("codistill/attempts", 1) - 1
    store.set(_ATTEMPT, name)
    joined = []
    for r in range(1, world):
        key = f"codistill/{name}/join/{r}"
        store.wait([key])
        token, count = store.get(key).decode().split()
        joined.append((token, int(count)))
    attempt = max([named_before, restarts, *(count for _, count in joined)])
    for token, _ in joined:
        store.set(f"codistill/{name}/ack/{token}", str(attempt))
    return name, attempt


def _device(cfg: RunConfig, local_rank: int) -> str:
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return cfg.device


def _init_process_group(cfg: RunConfig, device: str, rank: int, world: int, timeout: timedelta) -> int:
    """Start the default process group; return the number of this torchrun attempt (0: the
    first), agreed by every rank. Under torchrun the group lives in the attempt's namespace
    of torchrun's store (:func:`agree_attempt`)."""
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    if "MASTER_ADDR" not in os.environ:  # one process, no launcher (FSDP over one rank)
        dist.init_process_group(backend, timeout=timeout, store=dist.HashStore(), rank=0, world_size=1)
        return _restart_count()
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # another launcher's environment
        dist.init_process_group(backend, timeout=timeout)
        return 0
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    name, attempt = agree_attempt(store, rank, world, _restart_count(), timeout)
    dist.init_process_group(backend, timeout=timeout, store=dist.PrefixStore(f"codistill/{name}/pg", store),
                            rank=rank, world_size=world)
    return attempt


def run_distributed(
    cfg: RunConfig,
    out_dir: str,
    replica: int | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    allow_changes: bool = False,
    graceful_sigterm: bool = False,
) -> dict[str, Any]:
    """Entry point on every rank (reads torchrun's environment; works without it as W=1)."""
    if cfg.outer.every or cfg.codistill.teachers_from:
        raise ConfigError("outer.every (weight averaging) and codistill.teachers_from (offline "
                          "distillation) run in the one-process engine only")
    rank, world, local_rank = env_world()
    topo = make_topology(rank, world, cfg.replicas, replica)
    if cfg.workers not in (1, topo.workers):
        raise ConfigError(f"workers={cfg.workers}, but this torchrun job has {topo.workers} rank(s) per "
                          "replica: under torchrun W is the ranks per replica (world size / replicas, or the "
                          f"world of a job per replica); set workers to {topo.workers} or leave it at 1")
    set_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    device = _device(cfg, local_rank)
    timeout = timedelta(seconds=cfg.dist_timeout)
    own_pg, attempt = False, _restart_count()
    if (world > 1 or cfg.parallel == "fsdp") and not dist.is_initialized():
        attempt = _init_process_group(cfg, device, rank, world, timeout)
        own_pg = True
    try:
        groups = make_groups(topo, timeout)
        if rank == 0:
            where = "" if topo.one_world else f" (replica {topo.replica} of {cfg.replicas})"
            log.info("world %d: %d replica(s) x %d worker(s)%s", world,
                     topo.num_replicas if topo.one_world else 1, topo.workers, where)
        if _elastic_restart(out_dir, topo, attempt) and not resume:
            log.info("replica %d: torchrun restart %d: resuming from the newest valid checkpoint",
                     topo.replica, attempt)
            resume = True
        place = Placement([topo.replica], cfg.batch_size, device, topo, groups,
                          progress=progress and topo.replica == 0,
                          claim=functools.partial(_elastic_claim, out_dir, topo, attempt))
        return run(cfg, out_dir, place, None, resume, stop_at, overwrite, allow_changes, graceful_sigterm)
    except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise CollectiveTimeout(
            f"rank {rank} (replica {topo.replica}): a collective did not complete within "
            f"dist_timeout={cfg.dist_timeout:g}s — a rank of this job stalled or died; resume from "
            f"the last checkpoint with --resume ({str(e).splitlines()[0][:200]})") from e
    finally:
        if own_pg:
            dist.destroy_process_group()
