"""Codistillation in a Hugging Face Accelerate loop, which needs no integration: the plug-in
goes into it as into any loop. An LSTM learns the King James Bible byte by byte. Run alone it
trains one model; under the launcher, N replicas distil from each other, each on its own part
of the text (a replica may itself be several processes under ``accelerate launch``):

    python examples/accelerate_loop.py --steps 200
    codistill launch --replicas 2 --exchange runs/accelerate/exchange -- \\
        python examples/accelerate_loop.py --steps 200

The codistillation-specific lines are marked ``# codistill``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from codistill import AlphaSchedule, BoundedDrift, Codistiller, shard_dataset  # codistill
from codistill.data import build_text_corpus
from codistill.models import LSTMLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    a = p.parse_args()
    accelerator = Accelerator(gradient_accumulation_steps=a.accumulate)
    corpus = build_text_corpus("byte", seq_len=64, max_chars=1_000_000)  # rows of 65 byte ids
    train = shard_dataset(TensorDataset(corpus.train), worker=0, num_workers=1)  # codistill
    model = LSTMLM(vocab_size=256, embed_dim=64, hidden_dim=128)  # stands for your model
    cd = Codistiller.from_env(model, exchange_every=25, alpha=AlphaSchedule(burn_in=50),  # codistill
                              wait=BoundedDrift(25))  # codistill
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(train, batch_size=32, shuffle=True)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    while cd.step < a.steps:
        for (batch,) in loader:
            x, y = batch[:, :-1], batch[:, 1:]
            with accelerator.accumulate(model):
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                psi = cd.distill_loss(x, logits)  # codistill: α·ψ at step cd.step, 0 during burn-in
                accelerator.backward(loss + psi)  # codistill: + psi
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:  # an optimizer step was taken
                cd.after_step()  # codistill: count it; publish / refresh teachers when due
                if cd.step % 25 == 0:
                    accelerator.print(f"step {cd.step}: loss {loss.item():.3f} distill {psi.item():.4f}")
            if cd.step == a.steps:
                break
    cd.close()  # codistill: the last publish is written


if __name__ == "__main__":
    main()
