"""The byte corpus of lm-large: build order and split, memory-mapped windows, stream sampling."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import numpy as np
import pytest
import torch

from codistill.config import from_dict
from codistill.data import linux
from codistill.data.linux import ByteCorpus, build_corpus, document_key, is_held_out, linux_dir
from codistill.data.sharding import StreamSampler, stream_shard
from codistill.tasks import build_task


def _names(held_out: int, train: int) -> list[str]:
    """Relative paths giving ``held_out`` held-out and ``train`` training documents."""
    out, h, t, i = [], 0, 0, 0
    while h < held_out or t < train:
        rel = f"dir{i % 3}/file{i}.c"
        if is_held_out(document_key(rel)):
            if h < held_out:
                out.append(rel)
                h += 1
        elif t < train:
            out.append(rel)
            t += 1
        i += 1
    return out


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    contents = {}
    for n, rel in enumerate(_names(2, 30)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"/* {rel} */\nint f{n}(void) {{ return {n}; }}\n" * (1 + n % 4)
        path.write_bytes(text.encode())
        contents[rel] = text.encode()
    (root / "dir0" / "blob.bin").write_bytes(b"\x7fELF\x00\x01")  # binary: left out
    (root / "dir1" / "empty.h").write_bytes(b"")  # empty: left out
    os.symlink(root / "dir0", root / "link")  # a link: not followed, not a document
    return root, contents


def test_build_order_split_and_index(tree, tmp_path):
    root, contents = tree
    dest = tmp_path / "corpus"
    index = build_corpus(str(root), str(dest), source="hand-made")
    keyed = sorted((hashlib.sha256(rel.encode()).hexdigest(), rel) for rel in contents)
    want = {"train": b"", "valid": b""}
    for key, rel in keyed:
        want["valid" if int(key[:8], 16) % 100 < linux.HELD_OUT else "train"] += contents[rel] + b"\0"
    for split in ("train", "valid"):
        data = (dest / f"{split}.bin").read_bytes()
        assert data == want[split]
        assert index[split]["bytes"] == len(data)
        assert index[split]["sha256"] == hashlib.sha256(data).hexdigest()
    assert index["valid"]["documents"] == 2 and index["train"]["documents"] == 30
    assert index["skipped_binary_or_empty"] == 2
    assert json.loads((dest / "index.json").read_text()) == index
    rows = [line.split("\t") for line in (dest / "documents.tsv").read_text().splitlines()[1:]]
    assert [r[4] for r in rows] == [rel for _, rel in keyed]  # the documented order
    train = (dest / "train.bin").read_bytes()
    for _, split, offset, size, rel in rows:
        if split == "train":
            assert train[int(offset):int(offset) + int(size)] == contents[rel]
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    with pytest.raises(FileExistsError, match="remove it to rebuild"):
        build_corpus(str(root), str(dest))


def test_a_tree_without_held_out_text_is_refused_and_leaves_nothing(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    for rel in _names(0, 3):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    with pytest.raises(ValueError, match="held-out"):
        build_corpus(str(root), str(tmp_path / "corpus"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_windows_come_from_the_mapped_file(tree, tmp_path):
    root, _ = tree
    dest = tmp_path / "corpus"
    build_corpus(str(root), str(dest))
    corpus = ByteCorpus(str(dest), seq_len=8)
    raw = np.frombuffer((dest / "train.bin").read_bytes(), dtype=np.uint8)
    assert corpus.num_train == (raw.size - 1) // 8
    idx = np.array([0, 3, corpus.num_train - 1])
    got = corpus.train_windows(idx)
    assert got.dtype == torch.int64 and got.shape == (3, 9)
    for row, i in zip(got, idx):
        assert row.tolist() == raw[i * 8 : i * 8 + 9].tolist()
    assert isinstance(corpus.train, np.memmap)  # mapped, not read into memory
    assert corpus.bits_per_byte(np.log(2)) == pytest.approx(1.0)


def test_a_truncated_copy_is_named(tree, tmp_path):
    root, _ = tree
    dest = tmp_path / "corpus"
    build_corpus(str(root), str(dest))
    with open(dest / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"train\.bin holds 100 bytes, index\.json says"):
        ByteCorpus(str(dest), seq_len=8)


def test_the_corpus_is_found_or_the_set_up_command_is_named(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CODISTILL_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="codistill data linux"):
        linux_dir()
    with pytest.raises(FileNotFoundError, match="data.path .* is not a built corpus"):
        linux_dir(str(tmp_path))
    build_corpus(str(tree[0]), str(tmp_path / "env" / "linux"))
    monkeypatch.setenv("CODISTILL_DATA", str(tmp_path / "env"))
    assert linux_dir() == str(tmp_path / "env" / "linux")


def test_stream_shards_are_contiguous_disjoint_and_cover():
    blocks = [stream_shard(103, 3, s) for s in range(3)]
    assert blocks == [(0, 34), (34, 34), (68, 35)]
    assert stream_shard(103, 3, 1, "shared") == (0, 103)
    with pytest.raises(ValueError, match="shard must be in"):
        stream_shard(10, 2, 2)


def test_stream_sampler_draws_every_item_once_per_epoch_and_resumes():
    s = StreamSampler(first=1000, count=97, batch_size=8, seed=5)
    drawn = np.concatenate([s.next_batch() for _ in range(12)])  # 96 of 97 items
    assert len(set(drawn.tolist())) == 96 and drawn.min() >= 1000 and drawn.max() < 1097
    assert s.epoch == 0 and s.drawn == 96
    assert not np.array_equal(drawn[:8], np.arange(1000, 1008))  # shuffled, not in file order
    s.next_batch()
    assert s.epoch == 1  # the shard is used up: items repeat from here, and the epoch says so

    a = StreamSampler(0, 10_000, 64, seed=1)
    for _ in range(7):
        a.next_batch()
    b = StreamSampler(0, 10_000, 64, seed=1)
    b.load_state(a.state())
    for _ in range(5):
        np.testing.assert_array_equal(a.next_batch(), b.next_batch())
    other = StreamSampler(0, 10_000, 64, seed=2).next_batch()
    assert not np.array_equal(StreamSampler(0, 10_000, 64, seed=1).next_batch(), other)
    with pytest.raises(ValueError, match="smaller than one batch"):
        StreamSampler(0, 5, 8, seed=0)


def test_the_lm_task_gives_replicas_and_workers_disjoint_windows(tree, tmp_path):
    build_corpus(str(tree[0]), str(tmp_path / "corpus"))
    cfg = from_dict({"task": "lm", "replicas": 2, "batch_size": 4,
                     "data": {"name": "linux", "seq_len": 4, "path": str(tmp_path / "corpus")}})
    task = build_task(cfg)
    seen = []
    for replica in (0, 1):
        for worker in (0, 1):
            s = task.sampler(replica, 2, worker, 2, 4, shard_seed=0, order_seed=replica * 2 + worker)
            got = np.concatenate([s.next_batch() for _ in range(s.count // 4)])
            assert len(set(got.tolist())) == len(got)
            seen.append(set(got.tolist()))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not seen[i] & seen[j]
    x, y = task.train_batch(np.array([0, 1]), torch.Generator(), "cpu")
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (2, 4)
    (vx, vy), = task.val_batches(batch_size=1000, max_batches=1, device="cpu")
    assert vx.shape[1] == 4 and vx.shape[0] == task.corpus.num_val


def test_the_linux_corpus_is_byte_level(tree, tmp_path):
    from codistill.settings import ConfigError

    build_corpus(str(tree[0]), str(tmp_path / "corpus"))
    data = {"name": "linux", "level": "word", "path": str(tmp_path / "corpus")}
    cfg = from_dict({"task": "lm", "data": data})
    with pytest.raises(ConfigError, match="data.level"):
        build_task(cfg)
