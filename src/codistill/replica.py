"""One replica: its model, optimizer, data shard, RNG and codistiller, and the replica step.

Both launch paths build replicas here and train them with :func:`replica_step`, so both
run the same numbers. Nothing here knows what the task is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .averaging import OuterSync
from .checkpoint import Saved, State
from .codistiller import BoundedDrift, Codistiller, DistillLoss, LockStep, TeacherSpec, Trust
from .config import RunConfig
from .data import ShardSampler, StreamSampler
from .env import REPLICA_SEED_STRIDE
from .exchange import Exchange, state_nbytes
from .losses import AlphaSchedule, uniform_loss
from .modules import call_model
from .parallel import PRECISIONS, autocast, model_state
from .tasks import Batch, Task


@dataclass
class Replica:
    index: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: ShardSampler | StreamSampler
    codistiller: Codistiller
    spec: dict[str, Any]  # the complete model spec (saved with the weights)
    generator: torch.Generator  # data randomness (augmentation)
    rng_state: torch.Tensor = field(repr=False)  # torch's CPU RNG (dropout) while it is not stepping
    outer: OuterSync | None = None  # weight averaging across replicas (local SGD / DiLoCo)
    precision: str = "fp32"  # bf16: the student's forward and φ + ψ under autocast

    def next_batch(self, task: Task, device: str) -> Batch:
        return task.train_batch(self.sampler.next_batch(), self.generator, device)

    def _tensors(self) -> dict[str, Any]:
        """Model, optimizer and teachers through the distributed state-dict APIs: whole or
        sharded as they are laid out (tensors shared with the modules, so loading is in place)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"model": model_state(self.model),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
                "teachers": {str(p): model_state(t.module) for p, t in self.codistiller.teachers.items()
                             if t.version is not None}}

    def state(self) -> State:
        """Everything of this replica a checkpoint holds: weights, optimizer and teachers (this
        rank's part), the LR schedule, the codistiller's versions and counters, weight
        averaging's state, and this rank's data position and RNGs. A publish still in flight
        is finished first: the versions recorded are readable."""
        self.codistiller.exchange.flush()
        shared = {"scheduler": self.scheduler.state_dict(),
                  "codistiller": self.codistiller.state_dict(weights=False)}
        if self.outer is not None:
            shared["outer"] = self.outer.state_dict()
        worker = {"sampler": self.sampler.state(), "torch_rng": self.rng_state,
                  "generator": self.generator.get_state()}
        return State(self._tensors(), shared, worker)

    def load_state(self, saved: Saved) -> None:
        """Restore :meth:`state` from a checkpoint."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        cd = self.codistiller
        cd.load_state_dict(saved.shared["codistiller"])  # builds the teachers (no weights yet)
        tensors = self._tensors()
        saved.read_tensors(tensors)
        set_model_state_dict(self.model, tensors["model"])
        set_optimizer_state_dict(self.model, self.optimizer, tensors["optimizer"])
        for peer, t in cd.teachers.items():
            if str(peer) in tensors["teachers"]:
                set_model_state_dict(t.module, tensors["teachers"][str(peer)])
        self.scheduler.load_state_dict(saved.shared["scheduler"])
        if self.outer is not None:
            self.outer.load_state_dict(saved.shared["outer"])
        self.sampler.load_state(saved.worker["sampler"])
        self.rng_state = saved.worker["torch_rng"]
        self.generator.set_state(saved.worker["generator"])


# Strides of the seeds of a replica's random streams (primes: (seed, replica, worker) stay apart).
MODEL_SEED_STRIDE = REPLICA_SEED_STRIDE  # model init: seed + 1009·replica (env.replica_seed)
STREAM_SEED_STRIDE = 100_003  # its RNG stream: seed·100_003 + replica·1009 + worker
SAMPLER_SEED_STRIDE, SAMPLER_REPLICA_STRIDE = 7919, 131  # its shard sampler: seed·7919 + replica·131 + worker
GENERATOR_OFFSET = 7  # the generator of its batches: the stream's seed + 7


def model_seed(seed: int, replica: int) -> int:
    """Each replica starts from its own random init; replica 0 matches the N=1 baseline."""
    return seed + MODEL_SEED_STRIDE * replica


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


def apply_optimizer_config(cfg: RunConfig, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """After a checkpoint is loaded: lr, weight decay and momentum from ``cfg``, not the values
    the checkpoint's param groups carry (a resume with ``--allow-changes`` trains with the new
    ones); the moments and the schedule's position stay. Unchanged values: a no-op."""
    o = cfg.optimizer
    scheduler.base_lrs = [o.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = o.lr, o.weight_decay
        if "momentum" in group:  # sgd
            group["momentum"] = o.momentum
        group["lr"] = o.lr * factor(scheduler.last_epoch)  # as LambdaLR computes it
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def largest_model_bytes(cfg: RunConfig, task: Task) -> int:
    """Bytes of the weights of the largest replica model ``cfg`` declares (built on the meta
    device: nothing is allocated)."""
    sizes = []
    for r in range(cfg.replicas):
        with torch.device("meta"):
            model = task.build_model(task.model_spec(cfg.replica_model(r)))
        sizes.append(state_nbytes(model.state_dict()))
    return max(sizes)


def build_replica(
    cfg: RunConfig,
    task: Task,
    replica: int,
    exchange: Exchange,
    batch_size: int,
    worker: int = 0,
    num_workers: int = 1,
    wrap: Any = None,
    process_group: Any = None,
    fixed_teachers: int = 0,
    fixed_teacher_bytes: int = 0,
) -> Replica:
    """Build replica ``replica``: model (seeded per replica), optimizer, shard sampler, RNG.

    ``batch_size`` is the batch one process draws per step (W×b in the engine, b per worker
    in the distributed path, where ``worker``/``num_workers`` pick this rank's slice).
    ``wrap`` lays the model out over the replica's ranks after it is built (DDP or FSDP2,
    :func:`codistill.parallel.layout`); ``process_group`` (the replica's group) lets its first
    rank hand the teachers to the other ranks (under FSDP2, with ``codistill.shard_teachers``,
    each rank keeps a shard of every teacher);
    ``fixed_teachers``: peers numbered from ``cfg.replicas`` that are a finished run's models
    (``codistill.teachers_from``), built from the spec saved with their weights, the largest
    of ``fixed_teacher_bytes``.
    """
    spec = task.model_spec(cfg.replica_model(replica))
    # Replicas whose weights are averaged start from one init (replica 0's).
    torch.manual_seed(model_seed(cfg.seed, 0 if cfg.outer.every else replica))
    try:
        model: nn.Module = task.build_model(spec).to(cfg.device)
    except (TypeError, ValueError) as e:
        raise ValueError(f"replica {replica}: {e}") from e
    if wrap is not None:
        model = wrap(model)
    optimizer, scheduler = build_optimizer(cfg, model)
    stream = cfg.seed * STREAM_SEED_STRIDE + replica * MODEL_SEED_STRIDE + worker  # per (replica, worker)
    order = cfg.seed * SAMPLER_SEED_STRIDE + replica * SAMPLER_REPLICA_STRIDE + worker
    sampler = task.sampler(replica, cfg.replicas, worker, num_workers, batch_size, cfg.seed, order)
    c = cfg.codistill

    def teacher_factory(peer: int, meta: dict[str, Any]) -> nn.Module:
        if peer >= cfg.replicas:  # a finished run's model: the spec saved with its weights
            return task.build_model(meta["model"])
        # Teachers follow this run's config, not the spec a file in the exchange claims.
        return task.build_model(task.model_spec(cfg.replica_model(peer)))

    cd = Codistiller(
        model, exchange, replica=replica, num_replicas=cfg.replicas + fixed_teachers,
        exchange_every=c.exchange_every, alpha=AlphaSchedule(c.alpha, c.burn_in, c.ramp),
        loss=DistillLoss(c.distill, c.temperature), model_spec=spec, publish_dtype=c.publish_dtype,
        teachers=TeacherSpec(
            factory=teacher_factory,
            dtype=PRECISIONS[cfg.precision if c.teacher_dtype == "auto" else c.teacher_dtype],
            layout=wrap if cfg.parallel == "fsdp" and c.shard_teachers and wrap is not None else None),
        wait=LockStep(c.sync_timeout) if c.sync else BoundedDrift(c.max_drift, c.sync_timeout),
        process_group=process_group,
        trust=Trust(max_teacher_bytes=int(c.max_teacher_size * max(largest_model_bytes(cfg, task),
                                                                   fixed_teacher_bytes))),
    )
    rng = torch.Generator().manual_seed(stream).get_state()
    outer = OuterSync(model, cfg.outer.lr, cfg.outer.momentum) if cfg.outer.every else None
    return Replica(replica, model, optimizer, scheduler, sampler, cd, spec,
                   torch.Generator().manual_seed(stream + GENERATOR_OFFSET), rng, outer, cfg.precision)


def _fused(task: Task, cd: Codistiller, label_smoothing: float) -> bool:
    """φ and ψ can be computed in one pass: the default categorical φ, no label smoothing,
    ψ a KL or soft cross entropy at temperature 1."""
    return (task.output == "categorical" and label_smoothing == 0 and cd.loss.temperature == 1.0
            and cd.loss.kind in ("kl", "ce") and getattr(task.loss, "__func__", None) is Task.loss)


def replica_step(rep: Replica, task: Task, batch: Batch, step: int, grad_clip: float,
                 label_smoothing: float = 0.0, skip_nonfinite: bool = False) -> dict[str, Any]:
    """One optimizer step of φ + α·ψ on ``batch`` (φ with ``label_smoothing`` ε); returns the
    step's scalars: ``task_loss`` φ and ``distill_term`` α·ψ as 0-d tensors on the device (read
    only when logged: no host synchronisation here, unless ``skip_nonfinite``: then a step whose
    gradient norm is not finite is dropped (no optimizer step; ``skipped`` is 1 and its losses
    read 0)), ``alpha``, ``skipped`` and ``step_time`` as floats."""
    t0 = time.perf_counter()
    x, y = batch
    torch.set_rng_state(rep.rng_state)
    rep.model.train()
    cd = rep.codistiller
    alpha = cd.alpha(step)
    with autocast(str(x.device) if torch.is_tensor(x) else "cpu", rep.precision):
        outputs = call_model(rep.model, x)
        if _fused(task, cd, label_smoothing):  # φ and ψ in one pass over the student's and teachers' logits
            loss, phi, psi = cd.losses(x, outputs, y, step)
            term = alpha * psi
        else:
            phi = task.loss(outputs, y)
            if label_smoothing > 0:
                phi = (1 - label_smoothing) * phi + label_smoothing * uniform_loss(outputs, task.output)
            term = cd.distill_loss(x, outputs, step)
            loss = phi + term
    rep.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    skipped = 0.0
    if grad_clip > 0 or skip_nonfinite:
        # The norm after DDP's all-reduce: every rank of a replica takes the same decision.
        max_norm = grad_clip if grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(rep.model.parameters(), max_norm)
        if skip_nonfinite and not bool(torch.isfinite(norm)):
            skipped = 1.0
    if skipped:
        rep.optimizer.zero_grad(set_to_none=True)
        loss = phi = term = loss.new_zeros(())
    else:
        rep.optimizer.step()
    rep.scheduler.step()
    rep.rng_state = torch.get_rng_state()
    return {
        "task_loss": phi.detach(),  # φ
        "distill_term": term.detach(),  # α·ψ: the loss is φ + α·ψ, ψ is this ÷ α (formed when logged)
        "alpha": alpha,
        "skipped": skipped,
        "step_time": time.perf_counter() - t0,
    }
