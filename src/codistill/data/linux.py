"""A very large byte corpus that never repeats: the Linux kernel's source, read by memory map.

It ships as Debian's ``linux-source-6.12`` package (a 150 MB .deb holding the kernel tree as
a .tar.xz). The set-up step ``codistill data linux`` (:func:`install_linux`) downloads it
with ``apt-get download`` (no root), unpacks it into a temporary directory and builds the
corpus once (:func:`build_corpus`), in a fixed order:

* every regular file of the tree that holds text (no NUL byte, not empty) is one document;
  symbolic links and binary files are left out;
* a document's key is the SHA-256 of its path relative to the tree's top (``fs/ext4/inode.c``);
  documents are written in the order of their keys (a fixed shuffle: neighbouring files of
  one directory end up far apart, so any contiguous part of the stream is a sample of all of it);
* a document whose key's first 8 hex digits, read as a number, are ``< HELD_OUT`` mod 100 goes
  to ``valid.bin`` (held out), every other one to ``train.bin``; each is followed by one NUL
  byte, the end-of-document token;
* ``index.json`` records the package, the rule, byte and document counts and each file's
  SHA-256; ``documents.tsv`` lists every document (key, split, offset, bytes, path).

Training reads :class:`ByteCorpus`: windows of ``seq_len + 1`` bytes at multiples of
``seq_len`` (overlapping by one byte, so every byte is a target once), gathered straight from
the memory-mapped file, never loading the corpus into memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from .debian import already_installed, download_deb, extract_deb, search_dirs

log = logging.getLogger(__name__)

PACKAGE = "linux-source-6.12"
NAME = "linux"  # the corpus's directory name under $CODISTILL_DATA or the cache
HELD_OUT = 1  # percent of documents held out for validation
FILES = ("train.bin", "valid.bin", "index.json")
FORMAT = "codistill-byte-corpus/1"
_CHUNK = 1 << 20


def document_key(rel_path: str) -> str:
    """The SHA-256 (hex) of a document's path relative to the tree's top, ``/``-separated."""
    return hashlib.sha256(rel_path.encode("utf-8", "surrogateescape")).hexdigest()


def is_held_out(key: str) -> bool:
    """Whether the document with ``key`` belongs to the validation split."""
    return int(key[:8], 16) % 100 < HELD_OUT


def _documents(tree: str) -> list[tuple[str, str]]:
    """(key, relative path) of every regular file under ``tree``, in key order."""
    docs = []
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            rel = os.path.relpath(path, tree).replace(os.sep, "/")
            docs.append((document_key(rel), rel))
    docs.sort()
    return docs


def build_corpus(tree: str, dest: str, source: str = "") -> dict:
    """Write ``train.bin``, ``valid.bin``, ``index.json`` and ``documents.tsv`` for the text
    files under ``tree`` into ``dest`` (a new directory, filled under a temporary name and
    renamed, so a reader never sees a part-built corpus). Returns the index."""
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} exists; remove it to rebuild the corpus")
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(dest) + ".tmp-", dir=parent)
    try:
        index = _write_splits(tree, staging, source)
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index


def _write_splits(tree: str, out: str, source: str) -> dict:
    docs = _documents(tree)
    counts = {"train": [0, 0], "valid": [0, 0]}  # documents, bytes
    hashes = {"train": hashlib.sha256(), "valid": hashlib.sha256()}
    skipped = 0
    tsv = os.path.join(out, "documents.tsv")
    train_bin, valid_bin = os.path.join(out, "train.bin"), os.path.join(out, "valid.bin")
    with open(train_bin, "wb") as train, open(valid_bin, "wb") as valid, \
            open(tsv, "w", encoding="utf-8", errors="surrogateescape") as listing:
        listing.write("key\tsplit\toffset\tbytes\tpath\n")
        for key, rel in docs:
            with open(os.path.join(tree, rel), "rb") as f:
                data = f.read()
            if not data or b"\0" in data:
                skipped += 1
                continue
            split = "valid" if is_held_out(key) else "train"
            f_out = valid if split == "valid" else train
            offset = counts[split][1]
            f_out.write(data + b"\0")
            hashes[split].update(data + b"\0")
            counts[split][0] += 1
            counts[split][1] += len(data) + 1
            listing.write(f"{key}\t{split}\t{offset}\t{len(data)}\t{rel}\n")
        for f in (train, valid):
            f.flush()
            os.fsync(f.fileno())
    if counts["train"][1] < 2 or counts["valid"][1] < 2:
        raise ValueError(f"{tree}: too few text files for a corpus with a held-out split "
                         f"({counts['train'][0]} train / {counts['valid'][0]} held-out documents)")
    index = {
        "format": FORMAT, "source": source,
        "rule": f"documents in order of sha256(relative path); held out when int(key[:8], 16) % 100 < "
                f"{HELD_OUT}; each document followed by one NUL byte; files with a NUL byte skipped",
        "skipped_binary_or_empty": skipped,
        **{split: {"documents": c[0], "bytes": c[1], "sha256": hashes[split].hexdigest()}
           for split, c in counts.items()},
    }
    with open(os.path.join(out, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    (nt, bt), (nv, bv) = counts["train"], counts["valid"]
    log.info("corpus: %d train documents (%.1f MB), %d held out (%.1f MB), %d binary/empty files skipped",
             nt, bt / 1e6, nv, bv / 1e6, skipped)
    return index


def linux_dir(data_dir: str | None = None) -> str:
    """The directory of a built corpus: ``data_dir`` (``data.path``), else the first of
    ``$CODISTILL_DATA/linux`` and the cache's ``linux`` that holds one."""
    if data_dir is not None:
        missing = [n for n in FILES if not os.path.isfile(os.path.join(data_dir, n))]
        if missing:
            raise FileNotFoundError(f"data.path {data_dir!r} is not a built corpus (lacks "
                                    f"{', '.join(missing)}); build one: `codistill data linux --dest DIR`")
        return data_dir
    searched = search_dirs(NAME)
    for d in searched:
        if all(os.path.isfile(os.path.join(d, n)) for n in FILES):
            return d
    raise FileNotFoundError(f"the Linux source corpus was not found (searched {', '.join(searched)}); "
                            "run `codistill data linux` once (downloads Debian's "
                            f"{PACKAGE}, about 150 MB, and builds 1.3 GB), or set data.dir")


def install_linux(dest: str | None = None) -> str:
    """Set-up step: build the corpus from Debian's ``linux-source-6.12`` into ``dest`` (default:
    the cache's ``linux``), unless it is already there; returns its directory."""
    dest, done = already_installed("Linux source corpus", dest, linux_dir, lambda: search_dirs(NAME)[-1],
                                   lambda d: all(os.path.isfile(os.path.join(d, n)) for n in FILES))
    if done:
        return dest
    with tempfile.TemporaryDirectory(prefix="codistill-linux-") as tmp:
        deb = download_deb(PACKAGE, tmp)
        root = extract_deb(deb, os.path.join(tmp, "x"))
        tars = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(".tar.xz")]
        if len(tars) != 1:
            raise RuntimeError(f"{os.path.basename(deb)}: expected one .tar.xz of the source, found {tars}")
        os.unlink(deb)
        log.info("unpacking %s", tars[0])
        with tarfile.open(tars[0], "r:xz") as tar:
            tar.extractall(os.path.join(tmp, "src"), filter="data")
        os.unlink(tars[0])
        tops = os.listdir(os.path.join(tmp, "src"))
        tree = os.path.join(tmp, "src", tops[0]) if len(tops) == 1 else os.path.join(tmp, "src")
        build_corpus(tree, dest, source=os.path.basename(deb))
    log.info("Linux source corpus built in %s", dest)
    return dest


@dataclass
class ByteCorpus:
    """A built corpus read by memory map, as windows of ``seq_len + 1`` bytes (vocabulary 256)."""

    dir: str
    seq_len: int
    max_bytes: int | None = None  # read only the first bytes of the training split

    vocab_size = 256
    level = "byte"

    def __post_init__(self) -> None:
        with open(os.path.join(self.dir, "index.json"), encoding="utf-8") as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{self.dir}/index.json: format {self.index.get('format')!r}, "
                             f"expected {FORMAT!r}")
        self.train = np.memmap(os.path.join(self.dir, "train.bin"), dtype=np.uint8, mode="r")
        self.valid = np.memmap(os.path.join(self.dir, "valid.bin"), dtype=np.uint8, mode="r")
        for split, arr in (("train", self.train), ("valid", self.valid)):
            if arr.size != self.index[split]["bytes"]:
                raise ValueError(f"{self.dir}/{split}.bin holds {arr.size} bytes, index.json says "
                                 f"{self.index[split]['bytes']} (a partial copy?)")
        if self.max_bytes:
            self.train = self.train[: self.max_bytes]
        self.num_train = (self.train.size - 1) // self.seq_len
        self.num_val = (self.valid.size - 1) // self.seq_len
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f"{self.dir}: too small for data.seq_len={self.seq_len}")
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)

    def _windows(self, data: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len + self._offsets
        return torch.from_numpy(data[idx].astype(np.int64))

    def train_windows(self, indices: np.ndarray) -> torch.Tensor:
        """Training windows ``indices`` (``[len, seq_len + 1]`` int64)."""
        return self._windows(self.train, indices)

    def val_windows(self, indices: np.ndarray) -> torch.Tensor:
        """Held-out windows ``indices``."""
        return self._windows(self.valid, indices)

    def bits_per_byte(self, nats_per_token: float) -> float:
        return nats_per_token / math.log(2)
