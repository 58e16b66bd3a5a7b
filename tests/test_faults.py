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
from codistill.runlog import read_metrics


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


def _poisoned_task(cfg, bad_calls):
    """The run's real task, whose loss is NaN at the given calls (one call per replica step,
    replicas in turn): a fault injected into a real run."""
    from codistill.tasks import build_task

    task = build_task(cfg)
    real, calls = task.loss, [0]

    def loss(outputs, y):
        value = real(outputs, y)
        calls[0] += 1
        return value * float("nan") if calls[0] - 1 in bad_calls else value

    task.loss = loss
    return task


def test_non_finite_steps_are_skipped_and_counted(tiny_config_factory, tmp_path):
    cfg = from_dict(tiny_config_factory(name="skip", on_nonfinite="skip"))
    task = _poisoned_task(cfg, {2 * 6, 2 * 7})  # replica 0 at steps 6 and 7
    summary = run(cfg, str(tmp_path / "run"), progress=False, task=task)
    assert summary["end"] == cfg.steps
    rows = {(r["step"], r["replica"]): r for r in read_metrics(str(tmp_path / "run")) if r["kind"] == "train"}
    assert rows[(10, 0)]["skipped"] == pytest.approx(2 / 5) and rows[(10, 1)]["skipped"] == 0
    assert all(torch.isfinite(torch.tensor(r["task_loss"])) for r in rows.values())
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "replica-0" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_non_finite_loss_stops_the_run_and_names_the_last_good_checkpoint(tiny_config_factory, tmp_path):
    from codistill.loop import Diverged

    cfg = from_dict(tiny_config_factory(name="stop", checkpoint={"every": 5}))
    task = _poisoned_task(cfg, {2 * 12 + 1})  # replica 1 at step 12
    with pytest.raises(Diverged, match=r"replica 1: training loss nan over steps 11\.\.15 is not finite.*"
                                       r"last good checkpoint is step 10"):
        run(cfg, str(tmp_path / "run"), progress=False, task=task)
    rows = read_metrics(str(tmp_path / "run"))
    assert max(r["step"] for r in rows) == 10  # the rows written before it are kept


def test_a_diverging_run_is_an_error_not_a_success(tiny_config_factory, tmp_path, capsys):
    values = tiny_config_factory(name="diverge", steps=20, optimizer={"name": "sgd", "lr": 1e30})
    (tmp_path / "c.yaml").write_text(json.dumps(values))
    rc = main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "training loss" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()  # never reported as finished


def test_only_a_restart_of_a_job_that_started_training_resumes(tmp_path, monkeypatch):
    from codistill.launch import _elastic_restart, _mark_elastic, _unmark_elastic
    from codistill.topology import make_topology

    topo = make_topology(0, 2, 2)  # rank 0 of a one-world job
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    (tmp_path / ".elastic").write_text("job-a")  # left by an earlier job with the same id
    assert not _elastic_restart(str(tmp_path), topo, 0)
    _unmark_elastic(str(tmp_path), topo, 0)  # once it is to train: a finished or refused resume keeps it
    assert not (tmp_path / ".elastic").exists()
    assert not _elastic_restart(str(tmp_path), topo, 1)  # the first attempt never started: refuse again
    _mark_elastic(str(tmp_path), topo)  # the first attempt passed the checks and trains
    assert _elastic_restart(str(tmp_path), topo, 1)
    _unmark_elastic(str(tmp_path), topo, 1)  # a restart keeps its own job's marker
    assert _elastic_restart(str(tmp_path), topo, 1)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    assert not _elastic_restart(str(tmp_path), topo, 1)


def test_every_rank_agrees_on_a_torchrun_attempt_whatever_its_nodes_restart_count():
    """Regression (a restart across two torchrun agents, tests/test_multinode.py): torchrun's
    store outlives an attempt, and its restart count is per node: when one node's worker dies,
    the healthy node's workers are restarted with their count still 0. They took the previous
    attempt's store keys, so gloo connected to dead addresses and failed, costing that node a
    restart of its own. Every rank must take the same fresh namespace and attempt number, also
    when it asks before rank 0 has named the attempt (the previous name still in the store)."""
    import threading
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from codistill.launch import agree_attempt

    store = dist.HashStore()  # torchrun's store: one for every attempt

    def attempt(restarts: list[int], rank0_late: float = 0.0) -> list[tuple[str, int]]:
        got: list = [None] * len(restarts)

        def rank(r: int) -> None:
            time.sleep(rank0_late if r == 0 else 0.0)
            got[r] = agree_attempt(store, r, len(restarts), restarts[r], timedelta(seconds=30))

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(restarts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert None not in got and len(set(got)) == 1, got
        return got

    first = attempt([0, 0, 0])
    assert first[0][1] == 0
    second = attempt([0, 0, 1], rank0_late=0.5)  # rank 2's node failed; the others followed it
    assert second[0][1] == 1 and second[0][0] != first[0][0]
    third = attempt([0, 0, 0], rank0_late=0.5)  # a restart no count shows: rank 0 counted it
    assert third[0][1] == 2 and third[0][0] not in (first[0][0], second[0][0])
