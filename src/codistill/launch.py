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


def _elastic_marker(out_dir: str, topo: Topology) -> tuple[str, bool]:
    """The file naming the torchrun job that owns ``out_dir`` (per replica job, or one for a
    one-world job) and whether this rank writes it."""
    if topo.one_world:
        return os.path.join(out_dir, ".elastic"), topo.rank == 0
    return os.path.join(out_dir, f".elastic-replica{topo.replica}"), topo.is_leader


def _elastic_restart(out_dir: str, topo: Topology) -> bool:
    """True on a torchrun restart (``--max-restarts``) of a job whose earlier attempt started
    training in ``out_dir``: the run then resumes by itself. An attempt that was refused (an
    earlier run's files) never marked the directory, so its restart is refused too."""
    if not int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0):
        return False
    marker, _ = _elastic_marker(out_dir, topo)
    try:
        with open(marker, encoding="utf-8") as f:
            return f.read() == os.environ.get("TORCHELASTIC_RUN_ID", "")
    except FileNotFoundError:
        return False


def _unmark_elastic(out_dir: str, topo: Topology) -> None:
    """On a first attempt, remove a marker left by another job (it must not make a restart of
    this one resume); called once the run is to be trained, so a refused one changes nothing."""
    marker, writer = _elastic_marker(out_dir, topo)
    if writer and not int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) and os.path.exists(marker):
        os.remove(marker)


def _mark_elastic(out_dir: str, topo: Topology) -> None:
    marker, writer = _elastic_marker(out_dir, topo)
    if writer and "TORCHELASTIC_RUN_ID" in os.environ:
        atomic_write(marker, os.environ["TORCHELASTIC_RUN_ID"])


@contextlib.contextmanager
def _elastic_claim(out_dir: str, topo: Topology) -> Iterator[None]:
    """Around the taking of the run directory (its start-up checks): a stale marker goes
    first, this job's is written once the directory is this run's."""
    _unmark_elastic(out_dir, topo)
    yield
    _mark_elastic(out_dir, topo)


def _device(cfg: RunConfig, local_rank: int) -> str:
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return cfg.device


def _restart_store(rank: int, world: int) -> dict[str, Any]:
    """On a torchrun restart, the process group's keys in a namespace of this attempt: the
    launcher's store still holds the previous attempt's addresses, which the new ranks would
    otherwise try to connect to."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart in ("", "0"):
        return {}
    store, _, _ = next(dist.rendezvous("env://", rank, world))
    return {"store": dist.PrefixStore(f"codistill-attempt-{restart}/", store), "rank": rank,
            "world_size": world}


def run_distributed(
    cfg: RunConfig,
    out_dir: str,
    replica: int | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    allow_changes: bool = False,
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
    own_pg = False
    if (world > 1 or cfg.parallel == "fsdp") and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        alone = {} if "MASTER_ADDR" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(backend, timeout=timeout, **(_restart_store(rank, world) or alone))
        own_pg = True
    try:
        groups = make_groups(topo, timeout)
        if rank == 0:
            where = "" if topo.one_world else f" (replica {topo.replica} of {cfg.replicas})"
            log.info("world %d: %d replica(s) x %d worker(s)%s", world,
                     topo.num_replicas if topo.one_world else 1, topo.workers, where)
        if _elastic_restart(out_dir, topo) and not resume:
            log.info("replica %d: torchrun restart %s: resuming from the newest valid checkpoint",
                     topo.replica, os.environ.get("TORCHELASTIC_RESTART_COUNT"))
            resume = True
        place = Placement([topo.replica], cfg.batch_size, device, topo, groups,
                          progress=progress and topo.replica == 0,
                          claim=functools.partial(_elastic_claim, out_dir, topo))
        return run(cfg, out_dir, place, None, resume, stop_at, overwrite, allow_changes)
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
