"""Data headroom: batches per second each task's loader produces vs what a training step consumes.

    .venv/bin/python benchmarks/data_headroom.py [--tasks lm image click] [--repeats 5] [--seconds 1] \
        [--threads 1] [--clock wall|cpu]

Per task, at its config's batch size (lm: configs/demo.yaml, image: configs/image.yaml,
click: configs/click.yaml) with the task's default model (``Task.default_model``): the
loader is ``rep.next_batch(task, device)`` of a replica built by ``build_replica``, i.e.
``Task.train_batch`` over its ``ShardSampler`` (images include the augmentation); the
consumer is ``replica_step`` (one plain N=1 training step: forward, φ, backward, clipping,
Adam) over a pool of batches loaded beforehand (not one fixed batch: a model trained on one
batch over and over overfits it and its CPU step slows down, by ~1.5× for the LSTM, as
gradients turn denormal). Both are timed in interleaved windows of about ``--seconds``;
prints median batches/s of each and their ratio (goal ≥ 10×). The loader runs in the
training thread (no worker processes), so 1/ratio is the share of a step spent loading.
``--clock cpu`` times this thread's CPU time instead of wall time (robust to other processes).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from engine_efficiency import CLOCKS

from codistill.config import load_config
from codistill.exchange import MemoryExchange
from codistill.replica import build_replica, replica_step
from codistill.tasks import build_task

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TASKS = {"lm": "demo.yaml", "image": "image.yaml", "click": "click.yaml"}
POOL = 256  # batches the training step cycles through


def rate(fn: Callable[[], object], calls: int, clock: Callable[[], float]) -> float:
    """Calls per second of ``fn`` over ``calls`` calls."""
    t0 = clock()
    for _ in range(calls):
        fn()
    return calls / (clock() - t0)


def measure(name: str, a: argparse.Namespace) -> tuple[int, float, float, float]:
    """(batch size, median batches/s produced, median batches/s consumed, median ratio)."""
    cfg = load_config(str(CONFIGS / TASKS[name]), ["replicas=1", f"threads={a.threads}", "model={}"])
    task = build_task(cfg)
    rep = build_replica(cfg, task, 0, MemoryExchange(), cfg.batch_size)
    pool = [rep.next_batch(task, cfg.device) for _ in range(POOL)]
    step = 0

    def produce() -> None:
        rep.next_batch(task, cfg.device)

    def consume() -> None:
        nonlocal step
        replica_step(rep, task, pool[step % POOL], step, cfg.optimizer.grad_clip)
        step += 1

    # Window sizes from one warm-up call of each: about a.seconds per window.
    clock = CLOCKS[a.clock]
    n_produce = max(1, round(a.seconds * rate(produce, 3, clock)))
    n_consume = max(1, round(a.seconds * rate(consume, 3, clock)))
    made, used = [], []
    for i in range(a.repeats):  # interleaved, alternating who goes first
        pair = [(made, produce, n_produce), (used, consume, n_consume)]
        for out, fn, calls in pair if i % 2 == 0 else pair[::-1]:
            out.append(rate(fn, calls, clock))
    ratio = statistics.median(m / u for m, u in zip(made, used))
    return cfg.batch_size, statistics.median(made), statistics.median(used), ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="length of one timed window")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.threads} thread(s), {a.clock} clock, medians of {a.repeats} interleaved windows of "
          f"~{a.seconds:g} s; headroom: median of the paired ratios")
    print("| task | batch | loader (batches/s) | training step (batches/s) | headroom | loading share |")
    print("|---|---|---|---|---|---|")
    for name in a.tasks:
        b, made, used, ratio = measure(name, a)
        print(f"| {name} | {b} | {made:.0f} | {used:.1f} | {ratio:.0f}x | {1 / ratio:.1%} |", flush=True)


if __name__ == "__main__":
    main()
