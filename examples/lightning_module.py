"""Codistillation in PyTorch Lightning: a LightningModule around an LSTM learns the King James
Bible byte by byte. Run alone it trains one model; under the launcher, N replicas distil from
each other, each on its own part of the text. With ``--devices 2`` each replica is 2 DDP
processes, among which Lightning splits the replica's part:

    python examples/lightning_module.py --steps 200
    codistill launch --replicas 2 --exchange runs/lightning/exchange -- \\
        python examples/lightning_module.py --steps 200

The codistillation-specific lines are marked ``# codistill``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from codistill import AlphaSchedule, BoundedDrift, shard_dataset  # codistill
from codistill.data import build_text_corpus
from codistill.integrations.lightning import CodistillCallback, distill_loss  # codistill
from codistill.models import LSTMLM


class ByteLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = LSTMLM(vocab_size=256, embed_dim=64, hidden_dim=128)  # stands for your model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a teacher is called as teacher(x)
        return self.model(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch[0][:, :-1], batch[0][:, 1:]
        logits = self(x)
        psi = distill_loss(self, x, logits)  # codistill: α·ψ, 0 during burn-in
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if self.global_step % 25 == 0:
            self.print(f"step {self.global_step}: loss {loss:.3f} distill {psi:.4f}", flush=True)
        return loss + psi  # codistill

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--devices", type=int, default=1)
    a = p.parse_args()
    corpus = build_text_corpus("byte", seq_len=64, max_chars=1_000_000)  # rows of 65 byte ids
    train = shard_dataset(TensorDataset(corpus.train), worker=0, num_workers=1)  # codistill
    trainer = L.Trainer(
        max_steps=a.steps, accelerator="cpu", devices=a.devices, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[CodistillCallback(exchange_every=25, alpha=AlphaSchedule(burn_in=50),  # codistill
                                     wait=BoundedDrift(25))])  # codistill
    trainer.fit(ByteLM(), DataLoader(train, batch_size=32, shuffle=True))


if __name__ == "__main__":
    main()
