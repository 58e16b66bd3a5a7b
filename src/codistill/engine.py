"""N replicas trained round-robin in one process: the paper's Algorithm 1.

Each step, every replica takes one optimizer step on its own shard (W workers simulated by
a W×b batch); at exchange steps every replica publishes, then every replica refreshes its
teachers, so all replicas see their peers' weights from the same step. N=1 is the sync-SGD
baseline; α=0 with N>1 trains independent replicas, still evaluated as an ensemble.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, RunConfig
from .run import Placement, set_threads
from .run import run as run_placed
from .tasks import Task


def run(cfg: RunConfig, out_dir: str, progress: bool = True, overwrite: bool = False,
        resume: bool = False, stop_at: int | None = None, task: Task | None = None,
        allow_changes: bool = False, graceful_sigterm: bool = False) -> dict[str, Any]:
    """Train ``cfg.replicas`` replicas in this process; write metrics, checkpoints, weights.

    ``resume`` continues from the newest step every replica has a valid checkpoint of (a
    finished run is left as it is; a changed config is refused unless ``allow_changes``:
    :func:`~codistill.rundir.plan_resume`); ``stop_at`` checkpoints and stops there;
    ``task``: the loaded data of ``cfg`` (e.g. shared by a study's runs), else loaded here.
    ``graceful_sigterm``: a SIGTERM ends the run after the step in progress, with a
    checkpoint (summary ``stopped: True``; the CLI's behaviour, not a library caller's).
    Returns the summary (with the final evaluation; ``finished: True`` if there was nothing
    to resume).
    """
    if cfg.parallel == "fsdp":
        raise ConfigError("parallel: fsdp shards each replica across torchrun ranks; the one-process "
                          "engine trains whole models (run under torchrun, or set parallel: ddp)")
    set_threads(cfg)
    place = Placement(list(range(cfg.replicas)), cfg.workers * cfg.batch_size, cfg.device, progress=progress)
    return run_placed(cfg, out_dir, place, task, resume, stop_at, overwrite, allow_changes, graceful_sigterm)
