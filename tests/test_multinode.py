"""Multi-node replicas, with real processes on one host: two torchrun agents are two "machines".

Each agent is started as its own process (``--nnodes=2 --nproc-per-node=1``, c10d rendezvous
on a free port), in its own working directory, as it would be on its own node; the run
directory and the exchange directory are absolute paths elsewhere (the shared filesystem of
a real cluster). Both launch modes are covered: one world whose replicas sit on different
nodes, and one job per replica with a replica's ranks spread over two nodes. The last test
kills one node's worker under ``--max-restarts=1``: both agents restart their workers (the
healthy one through torchrun's membership change, with its own restart count still 0) and
the run resumes from its checkpoint by itself.

Launching and reading a run reuse tests/test_distributed.py's helpers and its config.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_distributed import (
    STEPS,
    SYNC,
    TIMEOUT,
    Job,
    _assert_one_row_per_step,
    _assert_same_weights,
    _by_step,
    _check_exchange_files,
    _check_refresh_schedule,
    _checkpoints,
    _children,
    _codistill,
    _free_port,
    _probe,
    _probe_ranks,
    _rows,
    _spec,
    _summary,
    _torchrun,
    _weights,
    write_config,
)

pytestmark = pytest.mark.slow  # torchrun agents and their workers: not in the fast tier


# -- launching two "nodes" --------------------------------------------------------------------
def _node_dir(base: Path, name: str) -> Path:
    """The working directory of one "machine" (nothing the run writes may land there)."""
    path = base / name
    path.mkdir(parents=True)
    return path


def _agents(script: list[str], base: Path, name: str, restarts: int = 0,
            env: dict[str, str] | None = None) -> list[Job]:
    """Two torchrun agents of one job, one process each, started separately as on two
    machines: c10d rendezvous at a free port of this host, each agent in its own directory."""
    launcher = _torchrun(1)[:-2]  # without the static master address: the rendezvous decides
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
            f"--rdzv-id={name}-{uuid.uuid4().hex[:8]}", f"--max-restarts={restarts}"]
    return [Job([*launcher, *rdzv, *script], base / "logs", f"{name}-node{n}", env,
                cwd=_node_dir(base, f"{name}-node{n}")) for n in (0, 1)]


@pytest.fixture
def running() -> Iterator[list[Job]]:
    """The jobs a test starts; any still running at its end (a failed check) are killed."""
    jobs: list[Job] = []
    yield jobs
    for job in jobs:
        if job.proc.poll() is None:
            job.kill_group()


def _finish(jobs: list[Job]) -> None:
    """Wait for every job to succeed; on a failure the others are killed."""
    try:
        for job in jobs:
            job.ok()
    finally:
        for job in jobs:
            if job.proc.poll() is None:
                job.kill_group()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _worker_of_rank(agents: list[Job], rank: int) -> int:
    """The pid of the worker process of global ``rank`` (a child of one of the agents)."""
    for agent in agents:
        for pid in _children(agent.proc.pid):
            try:
                if _environ(pid).get("RANK") == str(rank):
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker of rank {rank} among the agents' children")


# -- checking a run ---------------------------------------------------------------------------
def _check_finished(out: Path, ex: Path, replica: int, start: int = 0) -> None:
    """The replica ran to STEPS in lock-step, loading every version of its peer (the last one
    at the end), published its own, and learnt (finite, decreasing validation loss)."""
    summary = _summary(out, replica)
    assert (summary["start"], summary["end"]) == (start, STEPS), summary
    rows = _rows(out, replica)
    _assert_one_row_per_step(rows, replica)
    _check_refresh_schedule(rows, replica, sync=True)
    peer = str(1 - replica)
    assert _by_step(rows, "train", replica)[STEPS]["teacher_versions"] == {peer: STEPS}
    _check_exchange_files(ex, replica, _spec(out, replica))
    evals = _by_step(rows, "eval", replica)
    first, last = evals[0]["loss"], evals[STEPS]["loss"]
    assert math.isfinite(first) and math.isfinite(last) and last < first, (first, last)
    assert summary["weights"] == [str(out / f"replica-{replica}" / "model.safetensors")]


def _replica_on(agent: Job) -> int:
    """The replica whose first rank ran under ``agent`` (from the line it prints at the end)."""
    found = [r for r in (0, 1) if f"replica {r}: steps " in agent.stdout]
    assert len(found) == 1, agent.report()
    return found[0]


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory)


@pytest.fixture(scope="module")
def world_run(cfg_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Job]]:
    """One world of 2 replicas × 1 worker over two agents, lock-step, uninterrupted: (run
    directory, exchange directory, the agents)."""
    base = tmp_path_factory.mktemp("world")
    out, ex = base / "shared" / "run", tmp_path_factory.mktemp("store") / "exchange"
    agents = _agents(_codistill(cfg_path, out, "--exchange", str(ex), *SYNC), base, "world")
    _finish(agents)
    return out, ex, agents


# -- 1. one world across two nodes ----------------------------------------------------------
def test_one_world_of_two_replicas_across_two_nodes(world_run: tuple[Path, Path, list[Job]]) -> None:
    out, ex, agents = world_run
    # Each node ran one replica (rank 0 is replica 0, rank 1 replica 1).
    assert sorted(_replica_on(a) for a in agents) == [0, 1]
    for r in (0, 1):
        _check_finished(out, ex, r)
        assert _checkpoints(out, r) == [30, STEPS]
        assert (out / f"replica-{r}" / "model.safetensors").is_file()
    assert (out / "config.yaml").is_file()
    # The exchange is where it was told to be, the run directory holds no exchange, and the
    # agents' working directories are left as they were.
    assert sorted(p.name for p in ex.iterdir() if p.is_dir()) == ["replica-0", "replica-1"]
    assert not (out / "exchange").exists()
    for n in (0, 1):
        node = out.parents[1] / f"world-node{n}"
        assert node.is_dir() and not list(node.iterdir()), list(node.iterdir())


# -- 2. one job per replica, one replica over two nodes -------------------------------------
def test_one_job_per_replica_with_a_replica_over_two_nodes(cfg_path: Path, tmp_path: Path,
                                                          running: list[Job]) -> None:
    out, ex = tmp_path / "shared" / "run", tmp_path / "store" / "exchange"

    def job(r: int) -> list[str]:
        return _codistill(cfg_path, out, "--replica", str(r), "--num-replicas", "2", "--exchange", str(ex),
                          *SYNC)

    # Replica 0: W=2, one rank on each node; replica 1: W=1, a plain process on a third node.
    running += _agents(job(0), tmp_path, "replica0")
    running.append(Job([sys.executable, *job(1)], tmp_path / "logs", "replica1",
                       cwd=_node_dir(tmp_path, "replica1-node")))
    _finish(running)
    for r in (0, 1):
        _check_finished(out, ex, r)
    # Replica 0's checkpoints hold both ranks' data positions, written from the two nodes.
    for r, workers in ((0, ["worker-0.pt", "worker-1.pt"]), (1, ["worker-0.pt"])):
        folder = out / "checkpoints" / f"replica-{r}" / f"{STEPS:010d}"
        assert sorted(p.name for p in folder.glob("worker-*.pt")) == workers
    for name in ("replica0-node0", "replica0-node1", "replica1-node"):
        assert not list((tmp_path / name).iterdir()), name


# -- 3. a node's worker dies: both nodes restart and resume -----------------------------------
def test_a_killed_worker_on_one_node_restarts_both_and_resumes(
        cfg_path: Path, world_run: tuple[Path, Path, list[Job]], tmp_path: Path, running: list[Job]) -> None:
    """``--max-restarts=1`` on both agents; rank 1's worker is SIGKILLed after the checkpoint at
    step 20, while both replicas wait at step 25 (a slow publish, lock-step). Its agent
    restarts; the other agent sees it waiting at the rendezvous and restarts its own worker
    (torchrun's membership change: its restart count stays 0). The new workers resume from
    step 20 by themselves and end with the uninterrupted run's weights."""
    out, ex = tmp_path / "shared" / "run", tmp_path / "store" / "exchange"
    probe = _probe(cfg_path, out, "--exchange", str(ex), *SYNC)
    running += _agents(probe, tmp_path, "elastic", restarts=1, env={"CODISTILL_PROBE_SLOW_PUBLISH": "25:6"})
    deadline = time.monotonic() + TIMEOUT
    while not all(20 in _checkpoints(out, r) for r in (0, 1)):
        for agent in running:
            assert agent.proc.poll() is None, agent.report()
        assert time.monotonic() < deadline, "no checkpoint at step 20 in time"
        time.sleep(0.05)
    victim = _worker_of_rank(running, 1)
    os.kill(victim, signal.SIGKILL)
    _finish(running)

    for agent in running:
        # Both nodes' new workers knew it was a restart, the healthy node's too, and none failed
        # on the way (before: the healthy node's took the previous attempt's store keys, and gloo
        # failed to connect to dead addresses, which cost that node a restart of its own).
        assert "torchrun restart 1: resuming from the newest valid checkpoint" in agent.stderr, agent.report()
        assert "Traceback" not in agent.stderr, agent.report()
    world_out = world_run[0]
    for r in (0, 1):
        _check_finished(out, ex, r, start=20)
        _assert_same_weights(_weights(out, r), _weights(world_out, r), f"replica {r}: restarted vs whole")
    for info, _ in _probe_ranks(out, 2):
        assert info["teacher_versions"] == {str(1 - info["replica"]): STEPS}, info
