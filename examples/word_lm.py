"""A plain single-process PyTorch word-level LSTM language model, with 2-way codistillation
added in six lines, each marked ``# codistill``: the import, a seed of each replica's own,
its disjoint part of the data, the Codistiller (burn-in, how a teacher is called, what the
model predicts), ψ added to the loss, and the step counted. The last publish is written by a
background thread that finishes before the interpreter exits (or call ``cd.close()``).

The script is the usual kind: an RNN model whose ``forward(x, hidden)`` returns
``(log_probs, hidden)``, a hidden state carried from batch to batch, an optimizer loop. Run
alone it trains one model; under the launcher it trains N replicas that distil from each
other through a shared directory:

    python examples/word_lm.py --steps 300
    codistill launch --replicas 2 --exchange runs/word-lm/exchange -- \\
        python examples/word_lm.py --steps 300
"""

from __future__ import annotations

import argparse
import collections
import re

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import codistill  # codistill


class RNNModel(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.layers, self.dim = layers, dim
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, layers, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def init_hidden(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(self.layers, batch, self.dim)
        return zeros, zeros.clone()

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        out, hidden = self.rnn(self.embed(x), hidden)
        return torch.log_softmax(self.head(out), -1), hidden


class Windows(Dataset):
    """Consecutive windows of a token stream: (input, next tokens)."""

    def __init__(self, ids: torch.Tensor, length: int) -> None:
        self.ids, self.length = ids, length

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.length
        return self.ids[s : s + self.length], self.ids[s + 1 : s + self.length + 1]


def corpus(vocab_size: int) -> tuple[torch.Tensor, int]:
    """The King James Bible as word ids (the vocab_size - 1 commonest words, the rest <unk>)."""
    from codistill.data.text import kjv_path

    with open(kjv_path(), encoding="utf-8") as f:
        words = re.findall(r"[a-z']+|[.,;:?!]", f.read().lower())
    common = [w for w, _ in collections.Counter(words).most_common(vocab_size - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}
    return torch.tensor([index.get(w, 0) for w in words]), len(common) + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--burn-in", type=int, default=100, help="steps before distillation starts")
    a = p.parse_args()
    torch.manual_seed(codistill.replica_seed(a.seed))  # codistill
    ids, vocab = corpus(a.vocab)
    train = Windows(ids, a.bptt)
    train = codistill.shard_dataset(train)  # codistill
    loader = DataLoader(train, batch_size=a.batch, shuffle=True, drop_last=True)
    model = RNNModel(vocab)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cd = codistill.Codistiller.from_env(  # codistill
        model, exchange_every=25, alpha=codistill.AlphaSchedule(burn_in=a.burn_in),
        teachers=codistill.TeacherSpec(forward=lambda m, x: m(x, m.init_hidden(x.size(0)))),
        loss=codistill.DistillLoss(predictions="log_probs"))
    hidden, step = model.init_hidden(a.batch), 0
    while step < a.steps:
        for x, y in loader:
            hidden = tuple(h.detach() for h in hidden)
            log_probs, hidden = model(x, hidden)
            loss = cd.total_loss(x, log_probs, y)  # codistill: φ + α·ψ in one pass (was loss_fn(...))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25 * 4)
            opt.step()
            cd.after_step()  # codistill
            step += 1
            if step % 50 == 0:
                s = cd.stats()  # ψ apart from the task loss, α, the teachers' versions
                print(f"step {step}: loss {loss.item():.3f} psi {s.psi} alpha {s.alpha} "
                      f"teachers {s.teacher_versions}", flush=True)
            if step == a.steps:
                break


if __name__ == "__main__":
    main()
