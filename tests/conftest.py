"""Shared fixtures: a tiny run config, tiny language models, a small CPU budget."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

from codistill.models import build_model

# The suite runs on 2 CPU cores at most.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# A key or run id in the developer's shell would sign and filter every exchange the tests make.
for _var in ("CODISTILL_EXCHANGE_KEY", "CODISTILL_RUN_ID"):
    os.environ.pop(_var, None)

VOCAB = 20  # vocabulary of the hand-built test models (not the byte-level corpus)

TINY_CONFIG: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "steps": 30,
    "replicas": 2,
    "workers": 1,
    "batch_size": 8,
    "threads": 1,
    "log_every": 5,
    "model": {"name": "lstm", "embed_dim": 16, "hidden_dim": 32},
    "data": {"name": "bible", "level": "byte", "seq_len": 32, "max_chars": 200000},
    "optimizer": {"name": "adam", "lr": 0.003},
    "codistill": {"alpha": 1.0, "burn_in": 10, "exchange_every": 5, "distill": "kl"},
    "eval": {"every": 10, "batch_size": 16, "max_batches": 4},
}


@pytest.fixture(scope="session")
def tiny_config_factory():
    """``tiny_config_factory(**top_level)`` → a fresh tiny config dict (usable in wider scopes)."""

    def make(**top_level: Any) -> dict[str, Any]:
        return {**copy.deepcopy(TINY_CONFIG), **top_level}

    return make


@pytest.fixture
def tiny_config(tiny_config_factory) -> dict[str, Any]:
    """A fresh copy of a tiny, fast run config as plain values (as loaded from YAML)."""
    return tiny_config_factory()


LSTM_SPEC = {"name": "lstm", "vocab_size": VOCAB, "embed_dim": 8, "hidden_dim": 12}
TRANSFORMER_SPEC = {"name": "transformer", "vocab_size": VOCAB, "dim": 16, "num_layers": 1,
                    "heads": 2, "max_len": 16}


@pytest.fixture
def lstm_spec() -> dict[str, Any]:
    return dict(LSTM_SPEC)


@pytest.fixture
def transformer_spec() -> dict[str, Any]:
    return dict(TRANSFORMER_SPEC)


@pytest.fixture
def make_lm():
    """``make_lm(seed, spec=LSTM_SPEC)`` → a tiny language model with a seeded init."""

    def make(seed: int, spec: dict[str, Any] | None = None) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(dict(spec or LSTM_SPEC))

    return make


@pytest.fixture
def tokens() -> torch.Tensor:
    """A fixed batch of token ids ``[3, 10]`` in the test vocabulary."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (3, 10), generator=g)
