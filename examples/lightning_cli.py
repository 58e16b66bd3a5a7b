"""Codistillation through LightningCLI: the module adds ψ to its loss (two lines, marked
``# codistill``); the callback comes from the command line (it must be there: ``distill_loss``
names it when it is missing), and replicas launched with the same arguments keep their logs
and checkpoints apart by themselves:

    python examples/lightning_cli.py fit --trainer.max_steps 200 \
        --trainer.callbacks+=codistill.integrations.lightning.CodistillCallback
    codistill launch --replicas 2 --exchange runs/cli/exchange -- \\
        python examples/lightning_cli.py fit --trainer.max_steps 200 \\
        --trainer.callbacks+=codistill.integrations.lightning.CodistillCallback \\
        --trainer.callbacks.exchange_every=25 --trainer.callbacks.burn_in=50

Each replica writes ``lightning_logs/version_0-replica-R`` (metrics, hparams, checkpoints).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from codistill import shard_dataset
from codistill.data import build_text_corpus
from codistill.integrations.lightning import distill_loss  # codistill
from codistill.models import LSTMLM


class ByteLM(L.LightningModule):
    """A byte-level LSTM on the King James Bible (a stand-in for your model)."""

    def __init__(self, hidden: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = LSTMLM(vocab_size=256, embed_dim=64, hidden_dim=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch[0][:, :-1], batch[0][:, 1:]
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train_loss", loss)
        return loss + distill_loss(self, x, logits)  # codistill: α·ψ (0 alone and during burn-in)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class ByteData(L.LightningDataModule):
    """This replica's part of the first ``chars`` characters of the Bible, in rows of 65 bytes."""

    def __init__(self, chars: int = 1_000_000, batch_size: int = 32) -> None:
        super().__init__()
        self.chars, self.batch_size = chars, batch_size

    def train_dataloader(self) -> DataLoader:
        corpus = build_text_corpus("byte", seq_len=64, max_chars=self.chars)
        train = shard_dataset(TensorDataset(corpus.train), worker=0, num_workers=1)
        return DataLoader(train, batch_size=self.batch_size, shuffle=True)


if __name__ == "__main__":
    LightningCLI(ByteLM, ByteData, trainer_defaults={"accelerator": "cpu", "enable_progress_bar": False})
