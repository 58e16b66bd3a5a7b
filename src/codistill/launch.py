"""Distributed codistillation under torchrun: one training loop per rank.

Two launch modes:

* one world: ``torchrun --nproc-per-node=N*W -m codistill train CONFIG`` splits the world
  into N replicas of W ranks, each replica DDP over its own process group;
* one job per replica: ``codistill train CONFIG --replica R --num-replicas N --exchange DIR``
  (under torchrun for W > 1); replicas share only the exchange location.

This module only decides topology, process groups, DDP wrapping and the exchange; the loop,
replica step, losses and teachers are the engine's, so with W=1, the same seeds and
``codistill.sync`` on, both paths give the same numbers.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig
from .exchange import BackgroundExchange, Exchange, MemoryExchange, make_exchange, signing
from .exchange.collective import CollectiveExchange
from .files import atomic_write
from .loop import Loop, make_checkpointer, set_threads
from .parallel import layout
from .replica import build_replica
from .rundir import RunDir, plan_resume
from .tasks import build_task
from .topology import Groups, Topology, env_world, make_groups, make_topology

log = logging.getLogger(__name__)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``dist_timeout``: a rank stalled or died."""


def _exchange(cfg: RunConfig, topo: Topology, groups: Groups, device: str) -> Exchange:
    spec = cfg.codistill.exchange
    if spec == "collective":
        return CollectiveExchange(topo, groups, device)
    if spec == "memory":
        if topo.world_size > 1 or not topo.one_world:
            raise ConfigError("codistill.exchange 'memory' cannot cross processes: give a "
                              "directory, a URL or 'collective'")
        return MemoryExchange(keep=cfg.codistill.keep)
    exchange = make_exchange(spec, keep=cfg.codistill.keep)
    signing.secure(exchange, cfg)  # the key and run id
    return BackgroundExchange(exchange) if topo.is_leader else exchange


def _resume_step(loop: Loop, topo: Topology, groups: Groups) -> int | None:
    """The checkpoint step to resume from, agreed inside the replica (and, in one-world
    mode, across replicas: the newest step every replica has a valid checkpoint of)."""
    step = None
    if topo.is_leader:
        valid = loop.valid_steps()
        if topo.one_world and topo.num_replicas > 1 and dist.is_initialized():
            every: list[Any] = [None] * topo.num_replicas
            dist.all_gather_object(every, valid, group=groups.leaders)
            common = set(every[0]).intersection(*every[1:])
            step = max(common) if common else None
        else:
            step = valid[-1] if valid else None
    if topo.workers > 1 and dist.is_initialized():
        box = [step]
        dist.broadcast_object_list(box, src=topo.leader_rank(), group=groups.replica)
        step = box[0]
    return step


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


def train_rank(cfg: RunConfig, out_dir: str, topo: Topology, groups: Groups, device: str,
               resume: bool = False, stop_at: int | None = None, progress: bool = True,
               overwrite: bool = False, allow_changes: bool = False) -> dict[str, Any]:
    """Build this rank's replica and loop, resume if asked (or on a torchrun restart of this
    job), train; return the summary."""
    if _elastic_restart(out_dir, topo) and not resume:
        log.info("replica %d: torchrun restart %s: resuming from the newest valid checkpoint",
                 topo.replica, os.environ.get("TORCHELASTIC_RESTART_COUNT"))
        resume = True
    task = build_task(cfg)
    exchange = _exchange(cfg, topo, groups, device)
    in_group = groups.replica if topo.workers > 1 else None
    rep = build_replica(cfg, task, topo.replica, exchange, cfg.batch_size, topo.worker, topo.workers,
                        layout(cfg.parallel, groups.replica, device), in_group)
    ck = make_checkpointer(cfg, out_dir, rep, topo.worker, topo.workers, groups.replica)
    rundir = RunDir(out_dir, f"-replica{topo.replica}") if topo.is_leader else None
    loop = Loop(cfg, task, [rep], [ck], rundir, device, leader=topo.is_leader,
                progress=progress and topo.replica == 0, desc=f"{cfg.name} replica {topo.replica}",
                worker=topo.worker, workers=topo.workers, group=groups.replica)
    restored = _resume_step(loop, topo, groups) if resume else None
    if resume and restored is None:
        log.warning("replica %d: --resume found no valid checkpoint; starting afresh, replacing "
                    "its earlier metrics and exchange versions", topo.replica)
    who = "" if topo.one_world else f" (replica {topo.replica})"
    plan = plan_resume(cfg, out_dir, ck, restored, allow_changes, announce=topo.rank == 0, who=who,
                       suffix=f"-replica{topo.replica}")
    if plan is not None and plan.finished:
        exchange.close()
        return plan.summary(topo.worker)
    if restored is not None:
        loop.restore(restored)
    start = restored or 0
    _unmark_elastic(out_dir, topo)
    if rundir is not None:
        rundir.open(cfg, [ck], exchange, [topo.replica], restored, overwrite or resume,
                    write_config=topo.replica == 0, changes=plan and plan.changes)
    _mark_elastic(out_dir, topo)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    try:
        summary = loop.run(start, end, topo.worker)
    finally:
        if rundir is not None:
            rundir.close()
        exchange.close()
    return summary


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
        return train_rank(cfg, out_dir, topo, groups, device, resume, stop_at, progress, overwrite,
                          allow_changes)
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
