"""LSTM language model."""

from __future__ import annotations

import functools

import torch
from torch import nn


class LSTMLM(nn.Module):
    """Embedding → multi-layer LSTM → linear head; ``forward(x[B,T]) -> logits[B,T,V]``."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(
            embed_dim, hidden_dim, num_layers, batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_dim, embed_dim) if tie_weights and embed_dim != hidden_dim else None
        self.head = nn.Linear(embed_dim if tie_weights else hidden_dim, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.drop(self.embed(x))
        if e.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not _cpu_bf16():
            # oneDNN has no bf16 LSTM on CPUs without bf16 instructions: the recurrence runs
            # in its weights' dtype, the rest of the model under autocast.
            with torch.autocast("cpu", enabled=False):
                h, _ = self.lstm(e.to(self.lstm.weight_ih_l0.dtype))
        else:
            h, _ = self.lstm(e)
        h = self.drop(h)
        if self.proj is not None:
            h = self.proj(h)
        return self.head(h)


@functools.cache
def _cpu_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
