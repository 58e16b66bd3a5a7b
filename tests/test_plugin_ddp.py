"""The Codistiller plug-in in a user's own DDP loop, with real torchrun processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.slow  # a torchrun job: not in the fast tier

PROBE = os.path.join(os.path.dirname(__file__), "plugin_ddp_probe.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["probe"]), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("sync", [False, True], ids=["newest", "lock-step"])
def test_replica_ranks_share_the_leaders_teachers(tmp_path, sync):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.run([TORCHRUN, "--nproc-per-node=4", f"--master-port={_port()}", PROBE,
                          str(tmp_path / "ex"), str(tmp_path / "out"), *(["--sync"] if sync else [])],
                         capture_output=True, text=True, timeout=180, env=env)
    assert job.returncode == 0, job.stderr[-3000:]
    ranks = [_load(str(tmp_path / "out" / f"rank-{r}.safetensors")) for r in range(4)]
    for a, b in ((0, 1), (2, 3)):  # the two ranks of each replica
        (meta_a, ta), (meta_b, tb) = ranks[a], ranks[b]
        assert meta_a["versions"] == meta_b["versions"]
        # teachers were loaded: a replica sees its peer's version of the step before at least;
        # in lock-step mode exactly the peer's version of the last exchange step (12)
        assert list(meta_a["versions"].values())[0] >= 9
        if sync:
            assert meta_a["versions"] == {str(1 - a // 2): 12}
        assert ta.keys() == tb.keys() and any(k.startswith("teacher-") for k in ta)
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k  # identical model (DDP) and teachers
    assert not torch.equal(ranks[0][1]["model.1.weight"], ranks[2][1]["model.1.weight"])
    # only the replicas' first ranks published: one writer per replica folder
    assert sorted(os.listdir(tmp_path / "ex")) == ["replica-0", "replica-1"]
    assert [meta["bytes_published"] > 0 for meta, _ in ranks] == [True, False, True, False]
    # the teacher of replica 0 is replica 1's published version it names
    version = ranks[0][0]["versions"]["1"]
    with safe_open(str(tmp_path / "ex" / "replica-1" / f"{version:010d}.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("1.weight"), ranks[1][1]["teacher-1.1.weight"])
