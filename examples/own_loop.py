"""Add codistillation to your own PyTorch training loop.

Run with no arguments to start two replicas as two processes that share only a directory
exchange (each trains on its own half of the King James Bible):

    python examples/own_loop.py

or start each replica yourself, e.g. on two machines sharing a filesystem:

    python examples/own_loop.py --replica 0 --exchange /shared/run1
    python examples/own_loop.py --replica 1 --exchange /shared/run1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

import torch
from torch import nn

from codistill import AlphaSchedule, BoundedDrift, Codistiller
from codistill.data import build_text_corpus, shard_indices


class TinyLM(nn.Module):  # stands for "your model"
    def __init__(self, vocab: int = 256, dim: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])


def train(replica: int, num_replicas: int, exchange: str, steps: int) -> None:
    torch.manual_seed(replica)
    torch.set_num_threads(1)
    corpus = build_text_corpus("byte", seq_len=64, max_chars=1_000_000)
    shard = torch.from_numpy(shard_indices(len(corpus.train), num_replicas, replica))
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    # --- the codistillation part: one object, two calls in the loop ---------------------
    cd = Codistiller(model, exchange=exchange, replica=replica, num_replicas=num_replicas,
                     exchange_every=25, alpha=AlphaSchedule(burn_in=100), loss="kl",
                     wait=BoundedDrift(50))  # wait rather than run more than 2K steps ahead of a peer

    g = torch.Generator().manual_seed(replica)
    for step in range(steps):
        seqs = corpus.train[shard[torch.randint(len(shard), (32,), generator=g)]]
        x, y = seqs[:, :-1], seqs[:, 1:]
        logits = model(x)
        loss = cd.total_loss(x, logits, y, step)  # φ + α·ψ in one pass (α = 0 during burn-in)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cd.after_step(step + 1)  # publish own weights / refresh teachers when due
        if (step + 1) % 50 == 0:
            print(f"replica {replica} step {step + 1}: loss {loss.item():.3f} "
                  f"alpha {cd.alpha(step):g} staleness {cd.staleness(step + 1)}", flush=True)
    cd.close()  # the last publish is written by a background thread: wait for it


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replica", type=int)
    p.add_argument("--num-replicas", type=int, default=2)
    p.add_argument("--exchange", help="directory or URL shared by the replicas")
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    if a.replica is not None:
        if not a.exchange:
            p.error("--exchange is required with --replica")
        train(a.replica, a.num_replicas, a.exchange, a.steps)
        return
    with tempfile.TemporaryDirectory() as exchange:
        procs = [subprocess.Popen([sys.executable, __file__, "--replica", str(r), "--num-replicas",
                                   str(a.num_replicas), "--exchange", exchange, "--steps", str(a.steps)])
                 for r in range(a.num_replicas)]
        sys.exit(max(proc.wait() for proc in procs))


if __name__ == "__main__":
    main()
