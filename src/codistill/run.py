"""One run, whatever the launch mode: from a config and a :class:`Placement` to a summary.

A launch mode only decides the placement: which replicas this process trains and, under
torchrun, this rank's place among the replicas' ranks and their process groups. Everything
else is decided here, once: the exchange (in memory, a directory or URL, signed, written by
a background thread on a replica's first rank; or the collective one), the layout of each
model over its ranks, the checkpointers and their fingerprint, the run directory, which
checkpoint a ``--resume`` continues from (agreed by every rank of every replica in this
world), and the order of it all: task → exchange → replicas → checkpointers → run directory
→ resume → train → close. ``engine.run`` places every replica in one process;
``launch.run_distributed`` places one replica's rank per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import Checkpointer
from .config import ConfigError, RunConfig
from .exchange import BackgroundExchange, Exchange, MemoryExchange, make_exchange, signing, state_nbytes
from .exchange.collective import CollectiveExchange
from .loop import Loop
from .parallel import layout
from .replica import Replica, build_replica
from .rundir import RunDir, load_run_teachers, plan_resume
from .tasks import Task, build_task
from .topology import Groups, Topology

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """Where this process's part of a run trains.

    ``replicas``: the replicas it trains (all of them in the engine, stepped round-robin);
    ``batch_size``: the examples it draws per replica step (W×b in the engine, which
    simulates W workers; b on each of a replica's W ranks under torchrun); ``topology`` and
    ``groups``: this rank's place and its process groups under torchrun (None: one process
    trains whole replicas); ``claim``: a context around the taking of the run directory
    (its start-up checks; torchrun's restart marker).
    """

    replicas: list[int]
    batch_size: int
    device: str
    topology: Topology | None = None
    groups: Groups | None = None
    progress: bool = True
    claim: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext

    @property
    def worker(self) -> int:
        return self.topology.worker if self.topology else 0

    @property
    def workers(self) -> int:
        return self.topology.workers if self.topology else 1

    @property
    def leader(self) -> bool:
        """The first rank of its replica(s): it publishes, writes metrics and the summary."""
        return self.topology is None or self.topology.is_leader

    @property
    def announces(self) -> bool:
        """The process that logs what is said once per run (rank 0)."""
        return self.topology is None or self.topology.rank == 0

    @property
    def group(self) -> Any:
        """The replica's process group (None: one process)."""
        return self.groups.replica if self.groups else None

    @property
    def suffix(self) -> str:
        """Names this process's files in the run directory (``-replicaR`` under torchrun)."""
        return f"-replica{self.replicas[0]}" if self.topology else ""

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step of a replica: W×b in either launch mode."""
        return self.workers * self.batch_size


def build_exchange(cfg: RunConfig, place: Placement) -> Exchange:
    """The exchange of this process: replicas in one process share one in memory (whatever
    ``codistill.exchange`` names, a directory is still written if given); under torchrun a
    directory or URL written by a background thread on each replica's first rank (publishing
    off the step), or the collective one. A directory is signed before anything is published."""
    spec, keep, topo = cfg.codistill.exchange, cfg.codistill.keep, place.topology
    if spec == "collective" and topo is not None:
        return CollectiveExchange(topo, place.groups or Groups(None, None), place.device)
    if spec in ("collective", "memory"):
        if topo is not None and (topo.world_size > 1 or not topo.one_world):
            raise ConfigError("codistill.exchange 'memory' cannot cross processes: give a "
                              "directory, a URL or 'collective'")
        return MemoryExchange(keep=keep)
    exchange = make_exchange(spec, keep=keep)
    signing.secure(exchange, cfg)  # the key and run id, before anything is published
    return BackgroundExchange(exchange) if topo is not None and topo.is_leader else exchange


def make_checkpointer(cfg: RunConfig, run_dir: str, rep: Replica, place: Placement) -> Checkpointer:
    """The checkpointer of ``rep`` under ``RUN_DIR/checkpoints``, fingerprinted with the
    settings its data position and weights depend on (a resume with others is refused)."""
    fingerprint = {"task": cfg.task, "seed": cfg.seed, "replicas": cfg.replicas, "workers": place.workers,
                   "batch_size": cfg.batch_size, "effective_batch": place.effective_batch,
                   "data": dataclasses.asdict(cfg.data), "model": rep.spec,
                   "outer": dataclasses.asdict(cfg.outer)}
    return Checkpointer(os.path.join(run_dir, "checkpoints"), rep.index, place.worker, place.workers,
                        place.group, cfg.checkpoint.keep, fingerprint, cfg.to_dict())


def agree_resume(place: Placement, checkpointers: list[Checkpointer]) -> int | None:
    """The checkpoint step to resume from: the newest every replica of this process has a
    valid checkpoint of, agreed with the other replicas of a one-world torchrun job (through
    their first ranks) and handed to the replica's other ranks."""
    topo, groups = place.topology, place.groups
    step = None
    if place.leader:
        valid = set.intersection(*(set(ck.valid_steps()) for ck in checkpointers))
        if topo and topo.one_world and topo.num_replicas > 1 and dist.is_initialized():
            every: list[Any] = [None] * topo.num_replicas
            dist.all_gather_object(every, sorted(valid), group=groups.leaders if groups else None)
            valid = valid.intersection(*every)
        step = max(valid, default=None)
    if place.workers > 1 and dist.is_initialized():
        box = [step]
        dist.broadcast_object_list(box, src=topo.leader_rank() if topo else 0, group=place.group)
        step = box[0]
    return step


def set_threads(cfg: RunConfig, local_processes: int = 1) -> None:
    """torch intra-op threads: ``cfg.threads``, else the cores shared among local processes."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif local_processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


def run(cfg: RunConfig, out_dir: str, place: Placement, task: Task | None = None, resume: bool = False,
        stop_at: int | None = None, overwrite: bool = False, allow_changes: bool = False,
        graceful_sigterm: bool = False) -> dict[str, Any]:
    """Build this process's part of the run, resume it if asked, train it; return the summary.

    ``resume`` continues from the newest step every replica has a valid checkpoint of (a
    finished run is left as it is; a changed config is refused unless ``allow_changes``:
    :func:`~codistill.rundir.plan_resume`); ``stop_at`` checkpoints and stops there;
    ``task``: the loaded data of ``cfg``, else loaded here; ``graceful_sigterm``: a SIGTERM
    ends the run after the step in progress (``codistill train``; summary ``stopped``).
    """
    if task is None:
        task = build_task(cfg)  # before anything is written: a bad data path leaves no debris
    topo = place.topology
    with contextlib.ExitStack() as closing:  # whatever happens: the run directory, then the exchange
        exchange = build_exchange(cfg, place)
        closing.callback(exchange.close)
        rundir = RunDir(out_dir, place.suffix) if place.leader else None
        if rundir is not None:
            closing.callback(rundir.close)
        source = cfg.codistill.teachers_from
        fixed = load_run_teachers(source, cfg.replicas) if source else []
        for t in fixed:  # offline distillation: a finished run's models, published once
            exchange.publish(t.replica, t.step, t.state, t.meta)
        exchange.flush()
        fixed_bytes = max((state_nbytes(t.state) for t in fixed), default=0)
        wrap = layout(cfg.parallel, place.group, place.device) if topo else None
        in_group = place.group if place.workers > 1 else None
        replicas = [build_replica(cfg, task, r, exchange, place.batch_size, place.worker, place.workers, wrap,
                                  in_group, fixed_teachers=len(fixed), fixed_teacher_bytes=fixed_bytes)
                    for r in place.replicas]
        checkpointers = [make_checkpointer(cfg, out_dir, rep, place) for rep in replicas]
        names = " ".join(str(r) for r in place.replicas)
        loop = Loop(cfg, task, replicas, checkpointers, rundir, place.device, leader=place.leader,
                    progress=place.progress, desc=f"{cfg.name} replica {names}" if topo else cfg.name,
                    worker=place.worker, workers=place.workers, group=place.group)
        restored = agree_resume(place, checkpointers) if resume else None
        if resume and restored is None:
            log.warning("replica(s) %s: --resume found no valid checkpoint; starting afresh, replacing "
                        "their earlier metrics and exchange versions", names)
        who = f" (replica {names})" if topo and not topo.one_world else ""
        plan = plan_resume(cfg, out_dir, checkpointers[0], restored, allow_changes,
                           announce=place.announces, who=who, suffix=place.suffix)
        if plan is not None and plan.finished:
            return plan.summary(place.worker)
        if restored is not None:
            loop.restore(restored)
        elif fixed:
            for rep in replicas:
                rep.codistiller.refresh(0)
        start = restored or 0
        with place.claim():
            if rundir is not None:
                rundir.open(cfg, checkpointers, exchange, place.replicas, restored, overwrite or resume,
                            write_config=0 in place.replicas, changes=plan and plan.changes)
        if place.announces:
            log.info("run %s: task %s, N=%d W=%d b=%d K=%d B=%d alpha=%g, steps %d..%d -> %s", cfg.name,
                     cfg.task, cfg.replicas, place.effective_batch // cfg.batch_size, cfg.batch_size,
                     cfg.codistill.exchange_every, cfg.codistill.burn_in, cfg.codistill.alpha, start,
                     cfg.steps, out_dir)
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        with _stop_on_sigterm(loop) if graceful_sigterm else contextlib.nullcontext():
            return loop.run(start, end, place.worker)


@contextlib.contextmanager
def _stop_on_sigterm(loop: Loop) -> Any:
    """While ``loop`` runs alone (no process group, main thread): a SIGTERM (a scheduler's
    time limit, ``kill``) ends the run after the step in progress, with a checkpoint and its
    rows; a second one acts at once. Ranks of a group could stop at different steps, so they
    keep the default (torchrun restarts them from their last checkpoint)."""
    if dist.is_initialized() or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def stop(_signum: int, _frame: Any) -> None:
        loop.stop_requested = True
        signal.signal(signal.SIGTERM, previous)
        log.warning("SIGTERM: stopping after this step with a checkpoint (a second SIGTERM stops at once)")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
