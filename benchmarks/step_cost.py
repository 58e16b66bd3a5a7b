"""Per-step cost of codistillation against its floor, in one process.

The floor of a codistilled step is a plain training step plus one no-grad forward pass per
teacher. This measures, interleaved and repeated: the plain step, a teacher forward alone,
and the Codistiller step with 1..3 teachers, and prints medians and the ratios
``codistilled / plain`` and ``codistilled / (plain + k·forward)`` (overhead over the floor).

    .venv/bin/python benchmarks/step_cost.py [--repeats 7] [--steps 20]
    # the word-LM case of issue 9: 2-layer LSTM 64/64, vocabulary 28k, 20x35 tokens, 1 thread
    .venv/bin/python benchmarks/step_cost.py --vocab 28000 --embed 64 --hidden 64 --layers 2 \
        --batch 20 --seq-len 35 --threads 1 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from codistill import Codistiller, MemoryExchange, task_loss
from codistill.losses import task_and_distill_loss
from codistill.models import build_model


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    torch.manual_seed(0)
    SPEC = {"name": "lstm", "vocab_size": a.vocab, "embed_dim": a.embed, "hidden_dim": a.hidden,
            "num_layers": a.layers}
    x = torch.randint(0, a.vocab, (a.batch, a.seq_len))
    y = torch.randint(0, a.vocab, (a.batch, a.seq_len))
    model = build_model(SPEC)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def plain() -> None:
        loss = task_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    peer = build_model(SPEC).eval()

    @torch.no_grad()
    def forward() -> None:
        peer(x)

    steps_with: dict[int, Callable[[], None]] = {}
    for k in (1, 2, 3):
        ex = MemoryExchange()
        cd = Codistiller(model, ex, replica=0, num_replicas=k + 1, exchange_every=1, model_spec=SPEC)
        for r in range(1, k + 1):
            ex.publish(r, 1, build_model(SPEC).state_dict(), {"model": SPEC})
        if cd.refresh() != dict.fromkeys(range(1, k + 1), 1):
            raise RuntimeError("the teachers were not loaded")

        def step(cd: Codistiller = cd) -> None:
            logits = model(x)
            if a.fused:  # as the engine does: φ and ψ in one pass
                alpha, probs = cd.distill_target(x, 10)
                phi, psi = task_and_distill_loss(logits, y, probs)
                loss = phi + alpha * psi
            else:  # as a plug-in user writes it
                loss = task_loss(logits, y) + cd.distill_loss(x, logits, 10)
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
    print(f"LSTM {a.layers}x{a.embed}/{a.hidden}, vocabulary {a.vocab}, batch {a.batch}x{a.seq_len}, "
          f"{a.threads} threads, {'fused φ+ψ' if a.fused else 'φ and ψ apart'}, "
          f"medians of {a.repeats} x {a.steps} steps")
    print(f"plain training step: {med['plain'] * 1e3:.1f} ms; teacher forward (no grad): "
          f"{med['forward'] * 1e3:.1f} ms")
    for k in steps_with:
        floor = med["plain"] + k * med["forward"]
        print(f"{k} teacher(s): {med[f'k{k}'] * 1e3:.1f} ms/step = {med[f'k{k}'] / med['plain']:.2f}x plain, "
              f"{med[f'k{k}'] / floor:.2f}x its floor (plain + {k} forward)")


if __name__ == "__main__":
    main()
