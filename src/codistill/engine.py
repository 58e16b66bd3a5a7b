"""N replicas trained round-robin in one process: the paper's Algorithm 1.

Each step, every replica takes one optimizer step on its own shard (W workers simulated by
a W×b batch); at exchange steps every replica publishes, then every replica refreshes its
teachers, so all replicas see their peers' weights from the same step. N=1 is the sync-SGD
baseline; α=0 with N>1 trains independent replicas, still evaluated as an ensemble.
"""

from __future__ import annotations

import logging
from typing import Any

from .config import ConfigError, RunConfig
from .exchange import make_exchange, signing, state_nbytes
from .loop import Loop, make_checkpointer, set_threads
from .replica import build_replica
from .rundir import RunDir, plan_resume
from .tasks import Task, build_task
from .teachers import load_run_teachers

log = logging.getLogger(__name__)


def run(cfg: RunConfig, out_dir: str, progress: bool = True, overwrite: bool = False,
        resume: bool = False, stop_at: int | None = None, task: Task | None = None,
        allow_changes: bool = False) -> dict[str, Any]:
    """Train ``cfg.replicas`` replicas in this process; write metrics, checkpoints, weights.

    ``resume`` continues from the newest step every replica has a valid checkpoint of (a
    finished run is left as it is; a changed config is refused unless ``allow_changes``:
    :func:`~codistill.rundir.plan_resume`); ``stop_at`` checkpoints and stops there;
    ``task``: the loaded data of ``cfg`` (e.g. shared by a study's runs), else loaded here.
    Returns the summary (with the final evaluation; ``finished: True`` if there was nothing
    to resume).
    """
    if cfg.parallel == "fsdp":
        raise ConfigError("parallel: fsdp shards each replica across torchrun ranks; the one-process "
                          "engine trains whole models (run under torchrun, or set parallel: ddp)")
    set_threads(cfg)
    if task is None:
        task = build_task(cfg)  # before anything is written: a bad data path leaves no debris
    # In one process every exchange is equivalent; a directory is still written if given.
    spec = "memory" if cfg.codistill.exchange == "collective" else cfg.codistill.exchange
    exchange = make_exchange(spec, keep=cfg.codistill.keep)
    signing.secure(exchange, cfg)  # the key and run id, before anything is published
    source = cfg.codistill.teachers_from
    fixed = load_run_teachers(source, cfg.replicas) if source else []
    for t in fixed:  # offline distillation: a finished run's models, published once
        exchange.publish(t.replica, t.step, t.state, t.meta)
    exchange.flush()
    fixed_bytes = max((state_nbytes(t.state) for t in fixed), default=0)
    replicas = [build_replica(cfg, task, r, exchange, cfg.workers * cfg.batch_size, fixed_teachers=len(fixed),
                              fixed_teacher_bytes=fixed_bytes) for r in range(cfg.replicas)]
    checkpointers = [make_checkpointer(cfg, out_dir, rep) for rep in replicas]
    loop = Loop(cfg, task, replicas, checkpointers, RunDir(out_dir), cfg.device, progress=progress)
    steps = loop.valid_steps() if resume else []
    restored = steps[-1] if steps else None
    if resume and restored is None:
        log.warning("--resume found no valid checkpoint of every replica; starting afresh, "
                    "replacing this run's earlier metrics and exchange versions")
    plan = plan_resume(cfg, out_dir, checkpointers[0], restored, allow_changes)
    if plan is not None and plan.finished:
        exchange.close()
        return plan.summary()
    if restored is not None:
        loop.restore(restored)
    elif fixed:
        for rep in replicas:
            rep.codistiller.refresh(0)
    start = restored or 0
    assert loop.rundir is not None
    loop.rundir.open(cfg, checkpointers, exchange, list(range(cfg.replicas)), restored,
                     overwrite or resume, write_config=True, changes=plan and plan.changes)
    log.info("run %s: task %s, N=%d W=%d b=%d K=%d B=%d alpha=%g, steps %d..%d -> %s", cfg.name,
             cfg.task, cfg.replicas, cfg.workers, cfg.batch_size, cfg.codistill.exchange_every,
             cfg.codistill.burn_in, cfg.codistill.alpha, start, cfg.steps, out_dir)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    try:
        return loop.run(start, end)
    finally:
        loop.rundir.close()
        exchange.close()
