"""Codistillation in the Hugging Face Trainer: a tiny GPT-2 built from a config (no download)
learns the King James Bible byte by byte. Alone it trains one model; under the launcher, N
replicas that each train on their own part of the text and distil from each other:

    python examples/hf_trainer.py --steps 200
    codistill launch --replicas 2 --exchange runs/hf-trainer/exchange -- \\
        python examples/hf_trainer.py --steps 200

The codistillation-specific lines are marked ``# codistill``: ``CodistillTrainer`` is the
``Trainer`` with ψ added to its loss and the teachers exchanged on its optimizer steps. Each
replica writes into ``output_dir/replica-R`` by itself.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, GPT2Config, TrainingArguments

from codistill import AlphaSchedule, BoundedDrift, replica_seed, shard_dataset  # codistill
from codistill.data import build_text_corpus
from codistill.integrations.hf import CodistillTrainer  # codistill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    corpus = build_text_corpus("byte", seq_len=64, max_chars=1_000_000)  # rows of 65 byte ids
    train = [{"input_ids": row, "labels": row} for row in corpus.train]  # the model shifts labels
    train = shard_dataset(train, worker=0, num_workers=1)  # codistill: this replica's part
    config = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(replica_seed(0))  # codistill: each replica its own init
    model = AutoModelForCausalLM.from_config(config)
    args = TrainingArguments(output_dir="runs/hf-trainer", max_steps=a.steps, learning_rate=2e-3,
                             per_device_train_batch_size=a.batch, logging_steps=25, save_strategy="no",
                             report_to="none", disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available())  # also gives DDP on CPU under torchrun
    trainer = CodistillTrainer(model=model, args=args, train_dataset=train,  # codistill
                               codistiller=dict(exchange_every=25, wait=BoundedDrift(25),  # codistill
                                                alpha=AlphaSchedule(burn_in=50)))  # codistill
    trainer.train()
    trainer.save_model()  # with N > 1 replicas: runs/hf-trainer/replica-R, one per replica


if __name__ == "__main__":
    main()
