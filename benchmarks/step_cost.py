"""Per-step cost of codistillation against its floor, in one process.

The floor of a codistilled step is a plain training step plus one no-grad forward pass per
teacher. This measures, interleaved and repeated: the plain step, a teacher forward alone,
and the Codistiller step with 1..3 teachers, and prints medians and the ratios
``codistilled / plain`` and ``codistilled / (plain + k·forward)`` (overhead over the floor).

    .venv/bin/python benchmarks/step_cost.py [--repeats 7] [--steps 20]
    # the word-LM case of issue 9: 2-layer LSTM 64/64, vocabulary 28k, 20x35 tokens, 1 thread
    .venv/bin/python benchmarks/step_cost.py --vocab 28000 --embed 64 --hidden 64 --layers 2 \
        --batch 20 --seq-len 35 --threads 1 --steps 5
    # the other tasks, on their real data and default models (configs/image.yaml, click.yaml)
    .venv/bin/python benchmarks/step_cost.py --task image [--model resnet]
    .venv/bin/python benchmarks/step_cost.py --task click --batch 256

``--fused`` computes φ and ψ in one pass as the engine does (categorical tasks).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from codistill import Codistiller, MemoryExchange, task_loss
from codistill.config import load_config
from codistill.losses import task_and_distill_loss
from codistill.models import build_model
from codistill.tasks import build_task


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def setup(a: argparse.Namespace) -> tuple[dict, object, torch.Tensor, Callable, str, str]:
    """(model spec, inputs, targets, φ, ψ kind, description) of the task to measure."""
    if a.task == "lm":
        spec = {"name": "lstm", "vocab_size": a.vocab, "embed_dim": a.embed, "hidden_dim": a.hidden,
                "num_layers": a.layers}
        x = torch.randint(0, a.vocab, (a.batch, a.seq_len))
        y = torch.randint(0, a.vocab, (a.batch, a.seq_len))
        what = f"LSTM {a.layers}x{a.embed}/{a.hidden}, vocabulary {a.vocab}, batch {a.batch}x{a.seq_len}"
        return spec, x, y, task_loss, "kl", what
    cfg = load_config(f"configs/{a.task}.yaml")
    if a.model:  # another model: its own default settings, not the config's model's
        cfg.model = {"name": a.model}
    task = build_task(cfg)
    spec = task.model_spec(cfg.replica_model(0))
    x, y = task.train_batch(list(range(a.batch)), torch.Generator().manual_seed(0), "cpu")
    kind = "kl" if task.output == "categorical" else "bce"
    return spec, x, y, task.loss, kind, f"{a.task} {spec['name']}, batch {a.batch}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lm", choices=["lm", "image", "click"])
    p.add_argument("--model", default=None, help="image/click: the model name (default: the config's)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--fused", action="store_true", help="φ and ψ in one pass, as the engine computes them")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # One batch trained on again and again drives gradients to denormals, which slow this CPU's
    # LSTM kernels as the run goes on (plain steps from 70 to 120 ms): flush them to zero.
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    spec, x, y, phi_fn, kind, what = setup(a)
    fused = a.fused and kind == "kl"
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def call(m: torch.nn.Module) -> torch.Tensor:
        return m(*x) if isinstance(x, tuple) else m(x)

    def plain() -> None:
        loss = phi_fn(call(model), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    peer = build_model(spec).eval()

    @torch.no_grad()
    def forward() -> None:
        call(peer)

    steps_with: dict[int, Callable[[], None]] = {}
    for k in (1, 2, 3):
        ex = MemoryExchange()
        cd = Codistiller(model, ex, replica=0, num_replicas=k + 1, exchange_every=1, model_spec=spec,
                         loss=kind)
        for r in range(1, k + 1):
            ex.publish(r, 1, build_model(spec).state_dict(), {"model": spec})
        if cd.refresh() != dict.fromkeys(range(1, k + 1), 1):
            raise RuntimeError("the teachers were not loaded")

        def step(cd: Codistiller = cd) -> None:
            out = call(model)
            if fused:  # as the engine does: φ and ψ in one pass
                alpha, probs = cd.distill_target(x, 10)
                phi, psi = task_and_distill_loss(out, y, probs)
                loss = phi + alpha * psi
            else:  # as a plug-in user writes it
                loss = phi_fn(out, y) + cd.distill_loss(x, out, 10)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps_with[k] = step

    samples: dict[str, list[float]] = {"plain": [], "forward": [], **{f"k{k}": [] for k in steps_with}}
    for _ in range(a.repeats):  # interleaved, so drift in machine load hits every variant
        samples["plain"].append(timed(plain, a.steps))
        samples["forward"].append(timed(forward, a.steps))
        for k, fn in steps_with.items():
            samples[f"k{k}"].append(timed(fn, a.steps))
    med = {name: statistics.median(v) for name, v in samples.items()}
    print(f"{what}, {a.threads} threads, {'fused φ+ψ' if fused else 'φ and ψ apart'}, "
          f"medians of {a.repeats} x {a.steps} steps")
    print(f"plain training step: {med['plain'] * 1e3:.1f} ms; teacher forward (no grad): "
          f"{med['forward'] * 1e3:.1f} ms")
    for k in steps_with:
        floor = med["plain"] + k * med["forward"]
        print(f"{k} teacher(s): {med[f'k{k}'] * 1e3:.1f} ms/step = {med[f'k{k}'] / med['plain']:.2f}x plain, "
              f"{med[f'k{k}'] / floor:.2f}x its floor (plain + {k} forward)")


if __name__ == "__main__":
    main()
