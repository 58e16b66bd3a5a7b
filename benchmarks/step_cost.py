"""Per-step cost of codistillation against its floor, in one process.

The floor of a codistilled step is a plain training step plus one no-grad forward pass per
teacher. This measures, interleaved and repeated: the plain step, a teacher forward alone,
and codistilled steps with 1..3 teachers along three paths, and prints medians and the ratio
of each to its floor (plain + k·forward):

- ``apart``: ``task_loss(out, y) + cd.distill_loss(x, out)`` (φ and ψ in their own passes);
- ``plug-in``: ``cd.total_loss(x, out, y)``, the README's one call (φ + α·ψ in one pass);
- ``engine``: ``cd.losses(x, out, y)``, as the engine's ``replica_step`` computes it
  (categorical tasks; ``total_loss`` less its check of the targets).

    .venv/bin/python benchmarks/step_cost.py [--repeats 7] [--steps 20]
    # word LMs (issue 9's 2-layer LSTM 64/64, 20x35 tokens, 1 thread) at several vocabularies
    .venv/bin/python benchmarks/step_cost.py --vocab 256 8192 28000 32768 131072 --embed 64 \
        --hidden 64 --layers 2 --batch 20 --seq-len 35 --threads 1 --steps 5
    # the other tasks, on their real data and default models (configs/image.yaml, click.yaml)
    .venv/bin/python benchmarks/step_cost.py --task image [--model resnet]
    .venv/bin/python benchmarks/step_cost.py --task click --batch 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from codistill import Codistiller, MemoryExchange, task_loss
from codistill.config import load_config
from codistill.models import build_model
from codistill.tasks import build_task


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def setup(a: argparse.Namespace, vocab: int) -> tuple[dict, object, torch.Tensor, Callable, str, str]:
    """(model spec, inputs, targets, φ, ψ kind, description) of the task to measure."""
    if a.task == "lm":
        spec = {"name": "lstm", "vocab_size": vocab, "embed_dim": a.embed, "hidden_dim": a.hidden,
                "num_layers": a.layers}
        x = torch.randint(0, vocab, (a.batch, a.seq_len))
        y = torch.randint(0, vocab, (a.batch, a.seq_len))
        what = f"LSTM {a.layers}x{a.embed}/{a.hidden}, vocabulary {vocab}, batch {a.batch}x{a.seq_len}"
        return spec, x, y, task_loss, "kl", what
    cfg = load_config(f"configs/{a.task}.yaml")
    if a.model:  # another model: its own default settings, not the config's model's
        cfg.model = {"name": a.model}
    task = build_task(cfg)
    spec = task.model_spec(cfg.replica_model(0))
    x, y = task.train_batch(list(range(a.batch)), torch.Generator().manual_seed(0), "cpu")
    kind = "kl" if task.output == "categorical" else "bce"
    return spec, x, y, task.loss, kind, f"{a.task} {spec['name']}, batch {a.batch}"


def measure(a: argparse.Namespace, vocab: int) -> None:
    torch.manual_seed(0)
    spec, x, y, phi_fn, kind, what = setup(a, vocab)
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def call(m: torch.nn.Module) -> torch.Tensor:
        return m(*x) if isinstance(x, tuple) else m(x)

    def train(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    peer = build_model(spec).eval()

    @torch.no_grad()
    def forward() -> None:
        call(peer)

    paths = ["apart", "plug-in"] + (["engine"] if kind == "kl" else [])
    variants: dict[str, Callable[[], None]] = {"plain": lambda: train(phi_fn(call(model), y)),
                                               "forward": forward}
    for k in a.teachers:
        ex = MemoryExchange()
        cd = Codistiller(model, ex, replica=0, num_replicas=k + 1, exchange_every=1, model_spec=spec,
                         loss=kind)
        for r in range(1, k + 1):
            ex.publish(r, 1, build_model(spec).state_dict(), {"model": spec})
        if cd.refresh() != dict.fromkeys(range(1, k + 1), 1):
            raise RuntimeError("the teachers were not loaded")

        def apart(cd: Codistiller = cd) -> None:
            out = call(model)
            train(phi_fn(out, y) + cd.distill_loss(x, out, 10))

        def plugin(cd: Codistiller = cd) -> None:
            out = call(model)
            train(cd.total_loss(x, out, y, 10, ignore_index=None))

        def engine(cd: Codistiller = cd) -> None:
            out = call(model)
            train(cd.losses(x, out, y, 10).total)

        for name, fn in (("apart", apart), ("plug-in", plugin), ("engine", engine)):
            if name in paths:
                variants[f"{name} k{k}"] = fn

    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.repeats):  # interleaved, so drift in machine load hits every variant
        for name, fn in variants.items():
            samples[name].append(timed(fn, a.steps))
    med = {name: statistics.median(v) for name, v in samples.items()}
    print(f"\n{what}, {a.threads} thread(s), medians of {a.repeats} x {a.steps} steps: plain step "
          f"{med['plain'] * 1e3:.1f} ms, teacher forward (no grad) {med['forward'] * 1e3:.1f} ms")
    print("| V | teachers | floor (ms) | " + " | ".join(f"{p} (ms) | {p} / floor" for p in paths) + " |")
    print("|---|---|---|" + "---|---|" * len(paths))
    for k in a.teachers:
        floor = med["plain"] + k * med["forward"]
        cells = " | ".join(f"{med[f'{p} k{k}'] * 1e3:.1f} | {med[f'{p} k{k}'] / floor:.2f}x" for p in paths)
        print(f"| {vocab if a.task == 'lm' else '-'} | {k} | {floor * 1e3:.1f} | {cells} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lm", choices=["lm", "image", "click"])
    p.add_argument("--model", default=None, help="image/click: the model name (default: the config's)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, nargs="+", default=[256])
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--teachers", type=int, nargs="+", default=[1, 2, 3], help="numbers of teachers to time")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # One batch trained on again and again drives gradients to denormals, which slow this CPU's
    # LSTM kernels as the run goes on (plain steps from 70 to 120 ms): flush them to zero.
    torch.set_flush_denormal(True)
    for vocab in a.vocab if a.task == "lm" else a.vocab[:1]:
        measure(a, vocab)


if __name__ == "__main__":
    main()
