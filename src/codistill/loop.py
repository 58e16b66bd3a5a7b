"""The training loop of the replicas one process trains: step, exchange, log, evaluate,
checkpoint, summary.

The one-process engine runs it over all N replicas (stepped round-robin: the paper's
Algorithm 1, every replica publishing before any refreshes); each torchrun rank runs it over
its own replica. Nothing here knows the task or the launch mode.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Any

import torch

from .averaging import outer_sync
from .checkpoint import Checkpointer
from .config import RunConfig
from .metrics import evaluate_models
from .modules import unwrap
from .parallel import full_state
from .replica import Replica, apply_optimizer_config, replica_step
from .rundir import RunDir
from .tasks import Task

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """Training produced a non-finite or diverging loss; the message names the last good
    checkpoint."""


class StepSums:
    """One replica's step scalars summed since the last log (:func:`replica_step`'s output).
    Its losses stay on the device, summed in place (one add per tensor per step into tensors
    of its own, never the step's; no host synchronisation); the logged loss φ + α·ψ and ψ =
    α·ψ ÷ α are formed from the sums when read: α·ψ is summed per run of steps with one α."""

    def __init__(self) -> None:
        self.phi: torch.Tensor | None = None  # Σ φ
        self.term: torch.Tensor | None = None  # Σ α·ψ of the runs of α before the current one
        self.psi: torch.Tensor | None = None  # Σ ψ of those
        self.alpha: float | None = None  # the current run's α
        self.run: torch.Tensor | None = None  # Σ α·ψ over the current run
        self.scalars: dict[str, float] = defaultdict(float)  # α, skipped, step and exchange times

    def add(self, out: dict[str, Any]) -> None:
        phi, term, alpha = out["task_loss"], out["distill_term"], out["alpha"]
        if self.phi is None:
            self.phi = phi.clone()
        else:
            self.phi.add_(phi)
        if alpha != self.alpha:
            self._close_run()
            self.alpha = alpha
        if self.run is None:
            self.run = term.clone()
        else:
            self.run.add_(term)
        for k, v in out.items():
            if k not in ("task_loss", "distill_term"):
                self.scalars[k] += v

    def _close_run(self) -> None:
        if self.run is None:
            return
        a = self.alpha or 0.0
        psi = self.run / a if a > 0 else self.run.clone()
        self.term = self.run if self.term is None else self.term.add_(self.run)
        self.psi = psi if self.psi is None else self.psi.add_(psi)
        self.run = None

    def means(self, n: int) -> dict[str, float]:
        """Means over the ``n`` steps summed (losses over the steps not skipped)."""
        self._close_run()
        kept = max(1, n - int(self.scalars.get("skipped", 0)))
        phi = float(self.phi) if self.phi is not None else 0.0
        term = float(self.term) if self.term is not None else 0.0
        psi = float(self.psi) if self.psi is not None else 0.0
        return {"loss": (phi + term) / kept, "task_loss": phi / kept, "distill_loss": psi / kept,
                **{k: v / n for k, v in self.scalars.items()}}


class Loop:
    """Trains ``replicas`` (this process's) from a start step to an end step.

    ``leader``: this process is the first rank of its replica(s): it writes metrics into
    ``rundir``. Every process checkpoints (each rank its own worker state) and evaluates its
    share of the validation batches (``worker`` of ``workers`` ranks in the replica's
    ``group``; the metrics are reduced over the group).
    """

    def __init__(self, cfg: RunConfig, task: Task, replicas: list[Replica],
                 checkpointers: list[Checkpointer], rundir: RunDir | None, device: str,
                 leader: bool = True, progress: bool = True, desc: str | None = None,
                 worker: int = 0, workers: int = 1, group: Any = None) -> None:
        self.cfg, self.task, self.replicas, self.checkpointers = cfg, task, replicas, checkpointers
        self.rundir, self.device, self.leader = rundir, device, leader
        self.progress, self.desc = progress, desc or cfg.name
        self.group = group if workers > 1 else None
        every = task.val_batches(cfg.eval.batch_size, cfg.eval.max_batches, device)
        self.batches = every[worker::workers]
        # every rank runs as many forward passes (a sharded model's forward is a collective)
        self.uncounted = every[:1] * (-(-len(every) // workers) - len(self.batches))
        self.final: dict[str, Any] | None = None
        self.bytes_averaged = 0  # per replica: pseudo-gradients sent for weight averaging
        self.first_loss: dict[int, float] = {}  # per replica: task loss of the first step run here
        # Set (by a signal handler) to end the run after the step in progress, with a checkpoint.
        self.stop_requested = False

    # -- resume -----------------------------------------------------------------------
    def restore(self, step: int) -> None:
        """Load every local replica's checkpoint at ``step``; republish a version whose
        background write a crash may have lost."""
        for rep, ck in zip(self.replicas, self.checkpointers):
            rep.load_state(ck.load(step))
            apply_optimizer_config(self.cfg, rep.optimizer, rep.scheduler)
            cd = rep.codistiller
            if (cd.exchange.durable and cd.exchange_due(step)
                    and step not in cd.exchange.versions(rep.index)):
                cd.publish(step)
        log.info("replica(s) %s: resumed at step %d", [r.index for r in self.replicas], step)

    # -- one step ---------------------------------------------------------------------
    def publish_and_refresh(self, done: int) -> float:
        """Every due replica publishes, then every one refreshes (so replicas in one process
        see each other's weights of this very step). Returns the seconds it took."""
        due = [r.codistiller for r in self.replicas if r.codistiller.exchange_due(done)]
        t0 = time.perf_counter()
        for cd in due:
            cd.publish(done)
        for cd in due:
            cd.refresh(done)
        return time.perf_counter() - t0 if due else 0.0

    def evaluate(self, step: int, write: bool = True) -> dict[str, Any]:
        res = evaluate_models([unwrap(r.model) for r in self.replicas], self.batches, self.task.output,
                              self.group, self.uncounted)
        self.final = res
        if not (self.leader and write):
            return res
        assert self.rundir is not None
        for rep, metrics in zip(self.replicas, res["models"]):
            self.rundir.write({"step": step, "kind": "eval", "replica": rep.index, **metrics,
                               **self.task.derived_metrics(metrics)})
        if "ensemble" in res:
            ens = res["ensemble"]
            self.rundir.write({"step": step, "kind": "ensemble", "replica": "ensemble", **ens,
                               **self.task.derived_metrics(ens)})
            self.rundir.write({"step": step, "kind": "churn", "replica": "pairs", **res["churn"]})
        return res

    def _guard(self, rep: Replica, done: int, means: dict[str, float], n: int) -> None:
        """Stop the run if the training loss since the last log is not finite, more than
        ``diverge_factor`` × the loss of the first step this loop ran, or (``on_nonfinite:
        skip``) non-finite in more than half of the steps; name the last good checkpoint."""
        loss, skipped = means["task_loss"], means.get("skipped", 0.0)
        ref, factor = self.first_loss.get(rep.index, math.inf), self.cfg.diverge_factor
        if math.isfinite(loss) and not (factor and loss > factor * ref) and skipped <= 0.5:
            return
        what = ("not finite" if not math.isfinite(loss)
                else f"non-finite in {skipped:.0%} of the steps (all skipped)" if skipped > 0.5
                else f"more than {factor:g}× its first step's ({ref:.4g})")
        steps = [s for s in self.checkpointers[self.replicas.index(rep)].valid_steps() if s < done]
        last = (f"the last good checkpoint is step {steps[-1]} (continue from it with --resume once the "
                "cause is fixed)" if steps else "no checkpoint was written before it (see checkpoint.every)")
        raise Diverged(f"replica {rep.index}: training loss {loss:.4g} over steps {done - n + 1}..{done} is "
                       f"{what}; stopped. on_nonfinite=skip drops non-finite steps, diverge_factor=0 turns "
                       f"the divergence check off; {last}")

    def _train_row(self, rep: Replica, done: int, means: dict[str, float]) -> dict[str, Any]:
        cd = rep.codistiller
        stats = cd.stats(done)
        stale = stats.staleness
        return {"step": done, "kind": "train", "replica": rep.index,
                **means,
                "lr": rep.scheduler.get_last_lr()[0],
                "staleness": {str(p): s for p, s in stale.items()},
                "staleness_max": max((s for s in stale.values() if s is not None), default=None),
                "teacher_versions": {str(p): v for p, v in stats.teacher_versions.items()},
                "bytes_published": stats.bytes_published, "bytes_read": stats.bytes_read,
                "publish_wait_s": stats.publish_wait_s, "sync_wait_s": stats.sync_wait_s,
                "publish_failures": stats.publish_failures, "rejected_versions": stats.rejected_versions,
                **({"bytes_averaged": self.bytes_averaged} if rep.outer is not None else {})}

    # -- the loop ---------------------------------------------------------------------
    def run(self, start: int, end: int, worker: int = 0) -> dict[str, Any]:
        """Train from step ``start`` to ``end``; return a summary (``worker``: this rank's
        index inside its replica, recorded in it)."""
        cfg = self.cfg
        if start == 0:
            self.evaluate(0)
        elif start == end == cfg.steps:  # the final checkpoint, not the summary: its eval rows are in
            self.evaluate(end, write=False)
        acc: dict[int, StepSums] = defaultdict(StepSums)
        nacc = 0
        t_start = time.perf_counter()
        bar = _progress(range(start, end), desc=self.desc, initial=start, total=end,
                        disable=not (self.progress and self.leader), dynamic_ncols=True)
        for step in bar:
            for rep in self.replicas:
                out = replica_step(rep, self.task, rep.next_batch(self.task, self.device), step,
                                   cfg.optimizer.grad_clip, cfg.label_smoothing,
                                   skip_nonfinite=cfg.on_nonfinite == "skip")
                acc[rep.index].add(out)
                if rep.index not in self.first_loss:  # the divergence guard's reference (one read)
                    self.first_loss[rep.index] = float(out["task_loss"])
            nacc += 1
            done = step + 1
            seconds = self.publish_and_refresh(done)
            if seconds:
                for rep in self.replicas:
                    acc[rep.index].scalars["exchange_time"] += seconds / len(self.replicas)
            if cfg.outer.every and done % cfg.outer.every == 0:
                sent = outer_sync([r.outer for r in self.replicas if r.outer is not None])
                self.bytes_averaged += sent
            if self.stop_requested and done < end:  # this step is the last: logged and checkpointed
                end = done
            checkpoint_due = (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == end
            means = {}
            if done % cfg.log_every == 0 or checkpoint_due:  # on every rank: each stops by itself
                means = {rep.index: acc[rep.index].means(nacc) for rep in self.replicas}
                for rep in self.replicas:
                    self._guard(rep, done, means[rep.index], nacc)
            if self.leader and (done % cfg.log_every == 0 or done == end):
                assert self.rundir is not None
                for rep in self.replicas:
                    self.rundir.write(self._train_row(rep, done, means[rep.index]))
                bar.set_postfix(loss=f"{means[self.replicas[0].index]['task_loss']:.3f}")
            if done % cfg.log_every == 0 or done == end:
                acc.clear()
                nacc = 0
            if done % cfg.eval.every == 0 or done == cfg.steps:
                res = self.evaluate(done)
                bar.set_postfix(val=" ".join(f"{m['loss']:.3f}" for m in res["models"]))
            # Last: a checkpoint at this step holds every row written up to it.
            if checkpoint_due:
                for rep, ck in zip(self.replicas, self.checkpointers):
                    ck.save(done, rep.state())
            if done == end:
                break
        bar.close()
        wall = time.perf_counter() - t_start
        for rep in self.replicas:
            rep.codistiller.exchange.flush()
        summary: dict[str, Any] = {
            "name": cfg.name, "replicas": [r.index for r in self.replicas], "start": start, "end": end,
            "steps": cfg.steps, "wall_time_s": wall,
            "steps_per_s": (end - start) / wall if wall > 0 else None,
            "bytes_published": {r.index: r.codistiller.stats().bytes_published for r in self.replicas},
            "bytes_read": {r.index: r.codistiller.stats().bytes_read for r in self.replicas},
            "bytes_averaged": self.bytes_averaged,
            "publish_failures": {r.index: r.codistiller.stats().publish_failures for r in self.replicas},
            "final": self.final, "worker": worker, "stopped": end < cfg.steps and self.stop_requested,
        }
        if end == cfg.steps:  # a sharded model is gathered by every rank, one tensor at a time
            states = [full_state(r.model, keep=self.leader) for r in self.replicas]
        if self.leader and self.rundir is not None:
            if end == cfg.steps:
                summary["weights"] = [self.rundir.save_weights(r.index, state, r.spec)
                                      for r, state in zip(self.replicas, states)]
            self.rundir.write_summary(summary)
        return summary


class _Quiet:
    """A progress bar that shows nothing (no tqdm, or progress off)."""

    def __init__(self, steps: range, **_: Any) -> None:
        self.steps = steps

    def __iter__(self) -> Any:
        return iter(self.steps)

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(steps: range, disable: bool, **kwargs: Any) -> Any:
    """A tqdm bar over ``steps`` (the ``cli`` extra), or a silent one when off."""
    if disable:
        return _Quiet(steps)
    from ._extras import require

    return require("tqdm", "the progress bar (or pass progress=False)").tqdm(steps, **kwargs)
