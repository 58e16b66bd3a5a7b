"""Cost of ψ alone (forward + backward of the distillation loss on [rows, vocabulary] logits):
the autograd form (log_softmax + kl_div toward given probabilities), codistill's chunked
``distill_loss`` toward the same probabilities, and ``fused_loss`` from the teacher's logits
(what training uses: the teacher's softmax inside the pass, so it does more work than the
other two and still needs no [rows, V] probabilities), interleaved and repeated in one run;
prints medians and ratios.

    .venv/bin/python benchmarks/psi_cost.py [--rows 700] [--vocab 256 8192 28000 32768] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from step_cost import timed  # same folder: benchmarks are run as scripts

from codistill.fused import fused_loss
from codistill.losses import distill_loss


def autograd_psi(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """ψ as codistill computed it before: autograd through log_softmax and kl_div."""
    logq = torch.log_softmax(logits, dim=-1)
    return F.kl_div(logq, p, reduction="batchmean")


def fwd_bwd(fn, logits: torch.Tensor, p: torch.Tensor):
    def once() -> None:
        logits.grad = None
        fn(logits, p).backward()

    return once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=700, help="batch × time positions (35×20 in issue 9)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[256, 8192, 28000, 32768])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"ψ forward+backward on [{a.rows}, V] fp32 logits, {a.threads} thread(s), medians of "
          f"{a.repeats} x {a.steps}")
    print("| vocabulary | autograd form (ms) | distill_loss, chunked (ms) | ratio | fused_loss from "
          "teacher logits (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for v in a.vocab:
        g = torch.Generator().manual_seed(v)
        logits = torch.randn(a.rows, v, generator=g).requires_grad_()
        teacher = torch.randn(a.rows, v, generator=g)
        p = torch.softmax(teacher, -1)
        old, new, fused = [], [], []
        for _ in range(a.repeats):  # interleaved: drift in machine load hits all three
            old.append(timed(fwd_bwd(autograd_psi, logits, p), a.steps))
            new.append(timed(fwd_bwd(distill_loss, logits, p), a.steps))
            fused.append(timed(fwd_bwd(lambda z, t: fused_loss(z, [t]).total, logits, teacher), a.steps))
        mo, mn, mf = statistics.median(old), statistics.median(new), statistics.median(fused)
        print(f"| {v} | {mo * 1e3:.1f} | {mn * 1e3:.1f} | {mo / mn:.2f}x | {mf * 1e3:.1f} | {mo / mf:.2f}x |")


if __name__ == "__main__":
    main()
