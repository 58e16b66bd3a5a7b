"""Sharded replicas (FSDP2) and mixed precision, with real processes on gloo.

A replica sharded across its ranks publishes whole weights (gathered one tensor at a time),
loads sharded teachers, evaluates on every rank, and checkpoints through Distributed
Checkpoint; these tests check each of those against the whole-model (DDP) path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_distributed import (
    CONFIG,
    SYNC,
    _assert_same_weights,
    _by_step,
    _checkpoints,
    _codistill,
    _exchange_versions,
    _max_diff,
    _part,
    _probe,
    _probe_ranks,
    _rows,
    _run,
    _summary,
    _torchrun,
    _weights,
)

from codistill.checkpoint import read_state
from codistill.exchange.compression import dequantise, quantise

pytestmark = pytest.mark.slow  # torchrun jobs: not in the fast tier

FSDP = ["--set", "parallel=fsdp"]


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fsdp-config") / "dist.yaml"
    cfg: dict[str, Any] = copy.deepcopy(CONFIG)
    cfg["eval"] = {"every": 20, "batch_size": 16, "max_batches": 3}  # 3 batches over 2 ranks: uneven
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(cfg: Path, run: Path, nproc: int, log: Path, name: str, *args: str) -> None:
    _run([*_torchrun(nproc), *_codistill(cfg, run, "--exchange", str(run / "exchange"), *SYNC, *args)],
         log, name)


@pytest.fixture(scope="module")
def runs(cfg_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2 replicas x 2 ranks: FSDP2 uninterrupted, FSDP2 stopped at 20 and resumed, DDP."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    out = {name: root / name for name in ("fsdp", "resumed", "ddp")}
    _launch(cfg_path, out["fsdp"], 4, root, "fsdp", *FSDP)
    _launch(cfg_path, out["resumed"], 4, root, "stop", *FSDP, "--stop-at", "20")
    _launch(cfg_path, out["resumed"], 4, root, "resume", *FSDP, "--resume")
    _launch(cfg_path, out["ddp"], 4, root, "ddp")
    return out


def test_fsdp_replicas_train_publish_and_refresh(runs: dict[str, Path]) -> None:
    run = runs["fsdp"]
    for r in (0, 1):
        train = _by_step(_rows(run, r), "train", r)
        assert train[40]["task_loss"] < train[1]["task_loss"] - 0.3, "an FSDP replica did not learn"
        assert train[40]["teacher_versions"] == {str(1 - r): 40}  # sync: the peer's latest version
        # the exchange holds whole models, gathered from the shards
        assert _exchange_versions(run / "exchange", r) == [30, 35, 40]
        published = _weights(run, r)
        assert published["embed.weight"].shape[0] == 256  # whole, not one rank's half
        evals = _by_step(_rows(run, r), "eval", r)
        assert sorted(evals) == [0, 20, 40] and evals[40]["loss"] < evals[0]["loss"]


def test_fsdp_matches_ddp(runs: dict[str, Path]) -> None:
    """Same seeds, same batches: sharding changes where the weights live, not the numbers."""
    # Same arithmetic: sums over 2 ranks are exact in either order and /2 is exact, so the runs
    # are bit-identical here; but FSDP's unsharded weights live in its all-gather buffers, and a
    # BLAS may take another path for them on another CPU: a rounding-level difference. A 1 to 40
    # ulp change of the initial weights grows over these 40 Adam steps to 2e-6 to 5e-5 in the
    # weights and 5e-7 to 2.4e-6 in the losses (measured with the engine on this config): the
    # tolerances below leave 20× at least; a lost or misplaced shard changes the updates themselves.
    for r in (0, 1):
        fsdp, ddp = _rows(runs["fsdp"], r), _rows(runs["ddp"], r)
        for step in (1, 10, 20, 40):
            a, b = _by_step(fsdp, "train", r)[step], _by_step(ddp, "train", r)[step]
            assert a["task_loss"] == pytest.approx(b["task_loss"], abs=1e-4), (r, step)
            assert a["distill_loss"] == pytest.approx(b["distill_loss"], abs=1e-4), (r, step)
        # evaluation on both ranks (3 batches split 2 + 1, reduced) equals DDP's
        for step in (0, 20, 40):
            a, b = _by_step(fsdp, "eval", r)[step], _by_step(ddp, "eval", r)[step]
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), (r, step)
        assert _max_diff(_weights(runs["fsdp"], r), _weights(runs["ddp"], r)) < 1e-3


def test_fsdp_checkpoint_and_resume_equal_an_uninterrupted_run(runs: dict[str, Path]) -> None:
    run = runs["resumed"]
    for r in (0, 1):
        assert (_summary(run, r)["start"], _summary(run, r)["end"]) == (20, 40)
        assert _checkpoints(run, r) == [30, 40]
        _assert_same_weights(_weights(run, r), _weights(runs["fsdp"], r), f"replica {r}: resumed vs whole")
        # DCP: each rank wrote its shards; the optimizer's moments of every rank are in it
        folder = run / "checkpoints" / f"replica-{r}" / f"{40:010d}"
        assert sorted(p.name for p in (folder / "state").iterdir()) == [".metadata", "__0_0.distcp",
                                                                        "__1_0.distcp"]
        state = read_state(str(folder))
        final = _weights(run, r)
        assert all(torch.equal(state["model"][k], final[k]) for k in final)
        assert state["teachers"][str(1 - r)]["embed.weight"].shape == final["embed.weight"].shape
        exp_avg = state["optimizer"]["state"]["embed.weight"]["exp_avg"]
        assert exp_avg.shape == final["embed.weight"].shape and exp_avg.abs().sum() > 0


def test_one_rank_fsdp_matches_ddp(cfg_path: Path, tmp_path: Path) -> None:
    """W = 1: FSDP2 over a replica of one rank gives DDP's (plain) numbers."""
    for name, args in (("fsdp", FSDP), ("ddp", [])):
        _launch(cfg_path, tmp_path / name, 2, tmp_path, name, "--set", "steps=20", *args)
    for r in (0, 1):  # a rounding-level difference reaches 2.4e-6 in 20 steps (see above): 4× below
        a, b = _rows(tmp_path / "fsdp", r), _rows(tmp_path / "ddp", r)
        for step in range(1, 21):
            assert _by_step(a, "train", r)[step]["task_loss"] == pytest.approx(
                _by_step(b, "train", r)[step]["task_loss"], abs=1e-5), (r, step)


def test_bf16_fsdp_runs_end_to_end(cfg_path: Path, tmp_path: Path) -> None:
    """bf16 autocast for the student, bf16 sharded teachers; published weights stay fp32."""
    run = tmp_path / "bf16"
    _launch(cfg_path, run, 4, tmp_path, "bf16", *FSDP, "--set", "precision=bf16", "--set", "steps=20")
    for r in (0, 1):
        train = _by_step(_rows(run, r), "train", r)
        assert train[20]["task_loss"] < train[1]["task_loss"] - 0.2
        assert train[20]["distill_loss"] > 0 and train[20]["teacher_versions"] == {str(1 - r): 20}
        assert all(t.dtype == torch.float32 for t in _weights(run, r).values())


def test_int8_versions_through_the_collective_exchange_to_sharded_replicas(
        cfg_path: Path, tmp_path: Path) -> None:
    """2 replicas x 2 ranks, FSDP2, int8 versions sent by the collective exchange: each
    replica's first rank gathers and quantises its shards, the peer's ranks load the stored
    form into their sharded teacher, decoded."""
    run, steps = tmp_path / "run", 20
    _run([*_torchrun(4), *_probe(cfg_path, run, "--exchange", "collective", *FSDP, "--set", f"steps={steps}",
                                 "--set", "codistill.publish_dtype=int8")], tmp_path, "int8")
    final = {r: _weights(run, r) for r in (0, 1)}
    # stored: 1 byte per matrix element and a float32 scale per row; biases as they are
    stored = {r: sum(t.numel() + 4 * t.shape[0] if t.dim() >= 2 else t.numel() * t.element_size()
                     for t in final[r].values()) for r in (0, 1)}
    exchanges = len(range(10, steps + 1, 5))  # burn-in 10, K = 5: at 10, 15, 20
    for info, tensors in _probe_ranks(run, 4):
        r, peer = info["replica"], 1 - info["replica"]
        _assert_same_weights(_part(tensors, "model."), final[r], f"rank {info['rank']}")
        assert info["exchange"]["type"] == "CollectiveExchange", info
        assert info["bytes_published"] == (exchanges * stored[r] if info["leader"] else 0), info
        assert info["teacher_versions"] == {str(peer): steps}, info
        teacher = _part(tensors, f"teacher-{peer}.")
        assert teacher.keys() == final[peer].keys()
        for name, w in final[peer].items():
            # The teacher holds q · scale of the peer's final weights: the same float32
            # operations on the same bits, so exactly; biases travel as they are.
            want = dequantise(*quantise(w)) if w.dim() >= 2 else w
            assert teacher[name].dtype == torch.float32, name
            assert torch.equal(teacher[name], want), (info["rank"], name)
            assert not torch.equal(teacher[name], w) or w.dim() < 2, name  # it was quantised
    for r in (0, 1):
        train = _by_step(_rows(run, r), "train", r)
        assert train[steps]["task_loss"] < train[1]["task_loss"] - 0.2, "a replica did not learn"
        assert 0 < train[steps]["distill_loss"] < train[10]["task_loss"]
        assert train[steps]["bytes_read"] == exchanges * stored[1 - r]
