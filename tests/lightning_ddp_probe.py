"""One replica of 2 CPU processes under Lightning's DDP strategy, codistilling through
``CodistillCallback`` from a peer version the test published beforehand.

    CODISTILL_REPLICA=0 CODISTILL_NUM_REPLICAS=2 CODISTILL_EXCHANGE=DIR \\
        python tests/lightning_ddp_probe.py OUT_DIR

Each rank writes OUT_DIR/rank-R.json: its teacher versions, bytes published, ψ per step and a
checksum of its teacher's weights.
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
import torch.nn.functional as F

from codistill import AlphaSchedule
from codistill.integrations.lightning import CodistillCallback, distill_loss

VOCAB, DIM = 64, 16


class TinyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, DIM), torch.nn.Linear(DIM, VOCAB))
        self.psi: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        psi = distill_loss(self, x, logits)
        self.psi.append(psi.item())
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)) + psi

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (256, 8))
    data = torch.utils.data.TensorDataset(x, (x + 1) % VOCAB)
    callback = CodistillCallback(exchange_every=3, alpha=AlphaSchedule(burn_in=3))
    trainer = L.Trainer(max_steps=9, accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = TinyLM()
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    cd = callback.codistiller
    teacher = cd.teachers[1].module
    result = {"versions": cd.teacher_versions(), "bytes_published": cd.stats().bytes_published,
              "psi": model.psi,
              "teacher_sum": sum(float(v.double().sum()) for v in teacher.state_dict().values()),
              "steps": trainer.global_step, "world": trainer.world_size}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank-{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
