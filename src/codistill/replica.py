"""One replica: its model, optimizer, data shard and codistiller, and the replica step.

The one-process engine and the distributed trainer both build replicas here and train them
with :func:`replica_step`, so both paths run the same numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .codistiller import Codistiller
from .config import RunConfig
from .data import ShardSampler, TextCorpus, shard_indices
from .exchange import Exchange
from .losses import task_loss
from .models import build_model


@dataclass
class Replica:
    index: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: ShardSampler
    codistiller: Codistiller
    spec: dict[str, Any]


def model_seed(seed: int, replica: int) -> int:
    """Each replica starts from its own random init; replica 0 matches the N=1 baseline."""
    return seed + 1009 * replica


def build_optimizer(cfg: RunConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    o = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
    elif o.name == "adamw":
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / o.warmup) if o.warmup else 1.0
        if o.schedule == "cosine":
            progress = min(1.0, step / max(1, cfg.steps))
            return warm * 0.5 * (1 + math.cos(math.pi * progress))
        return warm

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def build_replica(
    cfg: RunConfig,
    replica: int,
    corpus: TextCorpus,
    exchange: Exchange,
    batch_size: int,
    worker: int = 0,
    num_workers: int = 1,
    wrap: Any = None,
    process_group: Any = None,
) -> Replica:
    """Build replica ``replica``: model (seeded per replica), optimizer, shard sampler.

    ``batch_size`` is the batch one process draws per step (W×b in the engine, b per worker
    in the distributed path, where ``worker``/``num_workers`` pick this rank's slice).
    ``wrap`` (e.g. a DDP constructor) wraps the model after it is built; ``process_group``
    (the replica's group) lets its first rank hand the teachers to the other ranks.
    """
    spec = {**cfg.replica_model(replica), "vocab_size": corpus.vocab_size}
    torch.manual_seed(model_seed(cfg.seed, replica))
    try:
        model: nn.Module = build_model(spec).to(cfg.device)
    except (TypeError, ValueError) as e:
        raise ValueError(f"replica {replica}: {e}") from e
    if wrap is not None:
        model = wrap(model)
    optimizer, scheduler = build_optimizer(cfg, model)
    shard = shard_indices(len(corpus.train), cfg.replicas, replica, cfg.seed, cfg.data.shards)
    shard = shard[worker::num_workers]
    sampler = ShardSampler(shard, batch_size, seed=cfg.seed * 7919 + replica * 131 + worker)
    c = cfg.codistill

    def teacher_factory(peer: int, meta: dict[str, Any]) -> nn.Module:
        # Teachers follow this run's config, not the spec a file in the exchange claims.
        return build_model({**cfg.replica_model(peer), "vocab_size": corpus.vocab_size}).to(cfg.device)

    cd = Codistiller(
        model, exchange, replica=replica, num_replicas=cfg.replicas,
        exchange_every=c.exchange_every, burn_in=c.burn_in, alpha=c.alpha, ramp=c.ramp,
        distill=c.distill, temperature=c.temperature, model_spec=spec,
        teacher_factory=teacher_factory, process_group=process_group,
    )
    return Replica(replica, model, optimizer, scheduler, sampler, cd, spec)


def next_batch(rep: Replica, corpus: TextCorpus, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.from_numpy(np.asarray(rep.sampler.next_batch()))
    seqs = corpus.train[idx].to(device)
    return seqs[:, :-1], seqs[:, 1:]


def replica_step(
    rep: Replica, batch: tuple[torch.Tensor, torch.Tensor], step: int, grad_clip: float
) -> dict[str, float]:
    """One optimizer step of φ + α·ψ on ``batch``; returns the step's scalars."""
    t0 = time.perf_counter()
    x, y = batch
    rep.model.train()
    logits = rep.model(x)
    phi = task_loss(logits, y)
    psi = rep.codistiller.distill_loss(x, logits, step)
    loss = phi + psi
    rep.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(rep.model.parameters(), grad_clip)
    rep.optimizer.step()
    rep.scheduler.step()
    return {
        "loss": float(loss.detach()),
        "task_loss": float(phi.detach()),
        "distill_loss": rep.codistiller.last_distill_loss or 0.0,
        "alpha": rep.codistiller.alpha(step),
        "step_time": time.perf_counter() - t0,
    }
