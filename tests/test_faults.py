"""Faults injected into real runs: a full disk while publishing, a flaky object store, an
exchange location that cannot be used."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from codistill.cli import main
from codistill.config import from_dict
from codistill.engine import run
from codistill.exchange import DirectoryExchange
from codistill.exchange.directory import _FsspecStore
from codistill.metrics import read_metrics


class FullDisk(MemoryFileSystem):
    """An in-memory object store whose next ``failures`` writes fail as a full disk does."""

    protocol = "fulldisk"
    failures = 0
    store: dict = {}
    pseudo_dirs = [""]

    def pipe_file(self, path, value, **kw):
        if FullDisk.failures > 0:
            FullDisk.failures -= 1
            raise OSError(28, "No space left on device")
        return super().pipe_file(path, value, **kw)


@pytest.fixture
def full_disk(monkeypatch):
    fsspec.register_implementation("fulldisk", FullDisk, clobber=True)
    monkeypatch.setattr(_FsspecStore, "BACKOFF", 0.0)
    FullDisk.store.clear()
    yield FullDisk
    FullDisk.failures = 0


def test_a_flaky_store_is_retried(full_disk):
    ex = DirectoryExchange("fulldisk://flaky")
    full_disk.failures = 2  # two transient failures, then the write goes through
    ex.publish(0, 10, {"w": torch.ones(3)}, {})
    assert ex.versions(0) == [10] and torch.equal(ex.load(0, 10).state["w"], torch.ones(3))


def test_a_full_disk_while_publishing_does_not_end_the_run(full_disk, tiny_config_factory, tmp_path):
    values = tiny_config_factory(name="full", codistill={**tiny_config_factory()["codistill"],
                                                         "exchange": "fulldisk://exchange"})
    cfg = from_dict(values)
    full_disk.failures = 2 * (_FsspecStore.RETRIES + 1)  # the first two publishes fail, retries included
    summary = run(cfg, str(tmp_path / "run"), progress=False)
    assert summary["end"] == cfg.steps and len(summary["weights"]) == 2  # completed, weights written
    assert sum(summary["publish_failures"].values()) == 2
    rows = [r for r in read_metrics(str(tmp_path / "run")) if r["kind"] == "train"]
    assert rows[-1]["teacher_versions"] == {"1": 30} or rows[-1]["teacher_versions"] == {"0": 30}
    assert max(r["publish_failures"] for r in rows) >= 1


def test_an_exchange_that_is_a_file_is_one_clear_error(tiny_config_factory, tmp_path, capsys):
    not_a_dir = tmp_path / "exchange"
    not_a_dir.write_text("a file")
    values = tiny_config_factory(name="bad", steps=4)
    values["codistill"]["exchange"] = str(not_a_dir)
    (tmp_path / "c.yaml").write_text(json.dumps(values))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "not a usable directory" in err and str(not_a_dir) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind
