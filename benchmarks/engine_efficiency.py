"""Engine efficiency: codistill's training loop against a minimal hand-written PyTorch loop.

    .venv/bin/python benchmarks/engine_efficiency.py [--tasks lm image click] [--replicas 1 2] \
        [--repeats 5] [--seconds 3] [--threads 1] [--losses torch|codistill] [--clock wall|cpu] \
        [--profile]

Per task (lm: configs/demo.yaml's byte LSTM; image: configs/image.yaml's CNN on Fashion-MNIST;
click: configs/click.yaml's MovieLens model) and N (1: the baseline; 2: codistillation in one
process, one teacher per replica, α=1 from step 0, K=50): windows of ~``--seconds`` of the
real ``Loop``, built as ``engine.run`` builds it (replicas, memory exchange, run directory),
interleaved with windows of a hand loop doing the same math: same model and initial weights,
batch size, Adam +
warm-up/cosine LambdaLR, gradient clipping, φ + α·ψ with N-1 frozen eval-mode teachers whose
weights are copied from their peers every K steps, batches from the task's same tensors (the
same augmentation for images). ``--losses torch`` writes φ and ψ with plain torch
(log_softmax + nll_loss + kl_div, or BCE); ``--losses codistill`` uses codistill's own loss
functions, so the ratio isolates the loop's overhead. Prints median ms/step of each and
engine_rate / hand_rate (goal ≥ 0.95) as the median over repeats of the ratio within each
interleaved pair of windows (robust to drift in the load of a shared machine). ``--clock
cpu`` times the training thread's CPU time instead of wall time (robust to other processes
on the cores; all of both loops' work runs in that thread).

Fairness: evaluation, logging, checkpoint intervals and the run's length lie beyond the
measured steps; the checkpoint ``Loop.run`` writes at the end of every call is replaced by a
no-op (the loop gets null checkpointers); each engine window still writes one train row per
replica and a summary (as at the end of any run). The two windows of a pair cover the same
steps, so they hold the same exchanges (every K steps). Both loops first run one untimed warm-up
window, which in the engine includes the step-0 evaluation and the first exchange (teachers
loaded). ``--profile`` then prints codistill's functions by cumulative time (cProfile) over
one more engine window per case.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import math
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from codistill.config import RunConfig, load_config
from codistill.data.images import augment, to_float
from codistill.exchange import make_exchange
from codistill.fused import fused_loss
from codistill.loop import Loop
from codistill.losses import distill_loss, task_loss
from codistill.modules import call_model
from codistill.replica import build_replica, model_seed
from codistill.run import Placement, make_checkpointer
from codistill.rundir import RunDir
from codistill.tasks import Task, build_task

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TASKS = {"lm": "demo.yaml", "image": "image.yaml", "click": "click.yaml"}
FAR = 10**9  # "never" for the eval/log intervals and the run's length
# wall: the step rate; cpu: the training thread's CPU time (all of both loops' work runs in it),
# robust to other processes competing for the cores of a shared machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def task_config(name: str, replicas: int, k: int, threads: int) -> RunConfig:
    return load_config(str(CONFIGS / TASKS[name]), [
        f"replicas={replicas}", f"threads={threads}", f"steps={FAR}", f"log_every={FAR}",
        f"eval.every={FAR}", "eval.max_batches=1", "checkpoint.every=0", "codistill.exchange=memory",
        "codistill.burn_in=0", "codistill.alpha=1.0", f"codistill.exchange_every={k}"])


class NoCheckpoint:
    """Stands in for a Checkpointer: ``Loop.run`` saves at the end of every call."""

    def save(self, step: int, rep: Any) -> None:
        pass

    def valid_steps(self) -> list[int]:
        return []


def engine_loop(cfg: RunConfig, task: Task, out_dir: str) -> Loop:
    """The Loop of ``engine.run`` (memory exchange, N replicas, a run directory)."""
    exchange = make_exchange("memory", keep=cfg.codistill.keep)
    reps = [build_replica(cfg, task, r, exchange, cfg.workers * cfg.batch_size) for r in range(cfg.replicas)]
    rundir = RunDir(out_dir)
    place = Placement(list(range(cfg.replicas)), cfg.workers * cfg.batch_size, cfg.device)
    rundir.open(cfg, [make_checkpointer(cfg, out_dir, rep, place) for rep in reps], exchange,
                list(range(cfg.replicas)), None, True, write_config=True)
    nulls: list[Any] = [NoCheckpoint() for _ in reps]
    return Loop(cfg, task, reps, nulls, rundir, cfg.device, progress=False)


def lr_factor(cfg: RunConfig):
    o = cfg.optimizer

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / o.warmup) if o.warmup else 1.0
        if o.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.steps)))
        return warm

    return factor


class HandLoop:
    """N replicas stepped round-robin, written out in plain PyTorch."""

    def __init__(self, cfg: RunConfig, task: Task, losses: str) -> None:
        if cfg.optimizer.name != "adam":
            raise ValueError("the hand loop writes Adam only")
        self.cfg, self.task, self.losses = cfg, task, losses
        spec = task.model_spec(cfg.model)
        n = cfg.replicas
        self.models = []
        for r in range(n):  # the engine's initial weights
            torch.manual_seed(model_seed(cfg.seed, r))
            self.models.append(task.build_model(spec))
        self.opts = [torch.optim.Adam(m.parameters(), lr=cfg.optimizer.lr,
                                      weight_decay=cfg.optimizer.weight_decay) for m in self.models]
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(cfg)) for o in self.opts]
        self.teachers = [[copy.deepcopy(self.models[j]).eval().requires_grad_(False)
                          for j in range(n) if j != i] for i in range(n)]
        self.peers = [[j for j in range(n) if j != i] for i in range(n)]
        perm = torch.randperm(task.train_size, generator=torch.Generator().manual_seed(0))
        self.shards = [perm[i::n] for i in range(n)]
        self.gen = [torch.Generator().manual_seed(i) for i in range(n)]
        self.order = [torch.empty(0, dtype=torch.long) for _ in range(n)]
        self.pos = [0] * n
        self.step = 0

    def indices(self, r: int) -> torch.Tensor:
        b = self.cfg.batch_size
        if self.pos[r] + b > len(self.order[r]):
            self.order[r] = self.shards[r][torch.randperm(len(self.shards[r]), generator=self.gen[r])]
            self.pos[r] = 0
        self.pos[r] += b
        return self.order[r][self.pos[r] - b : self.pos[r]]

    def batch(self, r: int) -> tuple[Any, torch.Tensor]:
        task, idx = self.task, self.indices(r)
        if self.cfg.task == "lm":
            seqs = task.corpus.train[idx]  # type: ignore[attr-defined]
            return seqs[:, :-1], seqs[:, 1:]
        if self.cfg.task == "image":
            x = to_float(task.train_x[idx])  # type: ignore[attr-defined]
            if self.cfg.data.augment:  # type: ignore[attr-defined]
                x = augment(x, self.gen[r], pad=self.cfg.data.pad)  # type: ignore[attr-defined]
            return x, task.train_y[idx]  # type: ignore[attr-defined]
        cat, num, y = (t[idx] for t in task.train)  # type: ignore[attr-defined]
        return (cat, num), y

    def loss(self, out: torch.Tensor, y: torch.Tensor, teacher_outs: list[torch.Tensor]) -> torch.Tensor:
        binary = self.task.output == "binary"
        if self.losses == "codistill" and not binary:
            return fused_loss(out, teacher_outs, y).total if teacher_outs else task_loss(out, y)
        p = None
        if teacher_outs:
            probs = [torch.sigmoid(o) if binary else torch.softmax(o, -1) for o in teacher_outs]
            p = probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)
        if self.losses == "codistill":
            phi = task_loss(out, y, "binary")
            return phi if p is None else phi + distill_loss(out, p, "bce")
        if binary:
            phi = F.binary_cross_entropy_with_logits(out, y)
            return phi if p is None else phi + F.binary_cross_entropy_with_logits(out, p)
        logq = F.log_softmax(out.reshape(-1, out.shape[-1]), dim=-1)
        phi = F.nll_loss(logq, y.reshape(-1))
        return phi if p is None else phi + F.kl_div(logq, p.reshape(logq.shape), reduction="batchmean")

    def run(self, steps: int) -> None:
        k = self.cfg.codistill.exchange_every
        for _ in range(steps):
            for r, (model, opt, sched) in enumerate(zip(self.models, self.opts, self.scheds)):
                x, y = self.batch(r)
                model.train()
                out = call_model(model, x)
                with torch.no_grad():
                    teacher_outs = [call_model(t, x) for t in self.teachers[r]]
                loss = self.loss(out, y, teacher_outs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.optimizer.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optimizer.grad_clip)
                opt.step()
                sched.step()
            self.step += 1
            if self.step % k == 0:
                for teachers, peers in zip(self.teachers, self.peers):
                    for t, j in zip(teachers, peers):
                        t.load_state_dict(self.models[j].state_dict())


def measure(name: str, n: int, a: argparse.Namespace, tmp: str, profiles: list[str]
            ) -> tuple[int, float, float, float]:
    """(steps per window, median engine s/step, median hand s/step, median of the paired ratios)."""
    cfg = task_config(name, n, a.every, a.threads)
    task = build_task(cfg)
    loop = engine_loop(cfg, task, os.path.join(tmp, f"{name}-{n}"))
    hand = HandLoop(cfg, task, a.losses)
    k = cfg.codistill.exchange_every
    loop.run(0, k)  # warm-up: step-0 evaluation, first exchange
    t0 = time.perf_counter()
    hand.run(k)
    window = max(1, round(a.seconds * k / (time.perf_counter() - t0)))  # steps in ~a.seconds
    done = k
    eng: list[float] = []
    ref: list[float] = []

    clock = CLOCKS[a.clock]

    def engine_window() -> None:
        nonlocal done
        t0 = clock()
        loop.run(done, done + window)
        eng.append((clock() - t0) / window)
        done += window

    def hand_window() -> None:
        t0 = clock()
        hand.run(window)
        ref.append((clock() - t0) / window)

    for i in range(a.repeats):  # interleaved, alternating who goes first
        for fn in (engine_window, hand_window) if i % 2 == 0 else (hand_window, engine_window):
            fn()
    if a.profile:  # codistill's functions by cumulative time over one more engine window
        prof = cProfile.Profile()
        prof.enable()
        loop.run(done, done + window)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats("codistill", 25)
        profiles.append(f"--- cProfile of one engine window ({window} steps), {name} N={n}\n{out.getvalue()}")
    assert loop.rundir is not None
    loop.rundir.close()
    ratio = statistics.median(h / e for e, h in zip(eng, ref))
    return window, statistics.median(eng), statistics.median(ref), ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--replicas", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0, help="length of one timed window")
    p.add_argument("--every", type=int, default=50, help="K, the exchange interval")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--losses", choices=("torch", "codistill"), default="torch",
                   help="the hand loop's φ and ψ: plain torch, or codistill's loss functions")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.threads} thread(s), {a.clock} clock, medians of {a.repeats} interleaved windows of "
          f"~{a.seconds:g} s, K={a.every}, hand loop's losses: {a.losses}")
    print("| task | N | steps/window | engine (ms/step) | hand loop (ms/step) | engine_rate / hand_rate |")
    print("|---|---|---|---|---|---|")
    profiles: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.tasks:
            for n in a.replicas:
                window, e, h, ratio = measure(name, n, a, tmp, profiles)
                print(f"| {name} | {n} | {window} | {e * 1e3:.2f} | {h * 1e3:.2f} | {ratio:.3f} |",
                      flush=True)
    print("\n".join(profiles))


if __name__ == "__main__":
    main()
