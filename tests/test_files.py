"""files.py: whole-or-nothing writes and chunked checksums."""

from __future__ import annotations

import hashlib
import os

import pytest

from codistill.files import CHUNK, atomic_write, sha256_file


def test_atomic_write_bytes_text_and_a_writer(tmp_path):
    path = str(tmp_path / "f")
    assert atomic_write(path, b"\x00\x01") == path
    assert open(path, "rb").read() == b"\x00\x01"
    atomic_write(path, "é", fsync=False)
    assert open(path, encoding="utf-8").read() == "é"
    atomic_write(path, lambda tmp: open(tmp, "w").write("by a writer"))
    assert open(path).read() == "by a writer"
    assert os.listdir(tmp_path) == ["f"]


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    path = str(tmp_path / "f")
    atomic_write(path, "old")

    def half(tmp: str) -> None:
        open(tmp, "w").write("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["f"]


def test_sha256_file_reads_in_chunks(tmp_path):
    data = os.urandom(2 * CHUNK + 17)
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(str(tmp_path / "big")) == hashlib.sha256(data).hexdigest()
