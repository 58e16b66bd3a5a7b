"""Shared fixtures: a tiny run config, tiny language models, a small CPU budget, a local S3 server."""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from s3server import REGION, FaultyProxy, S3Server, start_server

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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A local S3 server (moto, signatures checked) with a bucket, for the session; the test
    fails if it cannot start (tests/s3server.py)."""
    server = start_server(str(tmp_path_factory.mktemp("moto") / "server.log"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch, tmp_path) -> S3Server:
    """The standard AWS variables pointed at ``s3_server`` (and nothing of the developer's ~/.aws)."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server


@pytest.fixture
def s3_url(s3_env: S3Server) -> str:
    """A fresh ``s3://`` prefix in the server's bucket, the AWS variables set."""
    return f"s3://{s3_env.bucket}/run-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_proxy(s3_env: S3Server) -> Iterator[FaultyProxy]:
    """A proxy in front of ``s3_server`` that answers 503 on demand (``fail(method, n)``)."""
    proxy = FaultyProxy(s3_env.url)
    yield proxy
    proxy.stop()
