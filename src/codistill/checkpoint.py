"""Full resumable checkpoints of one replica, written atomically.

Layout under ``RUN_DIR/checkpoints/replica-R/``::

    0000000200/model.safetensors   weights (written by the replica's first rank)
    0000000200/trainer.pt          optimizer, LR schedule, step, teacher versions, counters
    0000000200/worker-W.pt         each worker's data position and RNG state
    0000000200/manifest.json       sha256 of every file; written last

Files are first written into a hidden staging folder, which the first rank renames to the
step's name once every worker's file is in and the manifest is written: a checkpoint folder
either is complete or does not exist. Loading verifies the checksums and falls back to the
previous checkpoint if the newest is damaged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger(__name__)

FORMAT = "codistill-checkpoint/1"
_FILE = re.compile(r"model\.safetensors|trainer\.pt|worker-\d+\.pt|teacher-\d+\.safetensors")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(group: Any) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def replica_dir(root: str, replica: int) -> str:
    return os.path.join(root, f"replica-{replica}")


def save_checkpoint(
    root: str,
    replica: int,
    step: int,
    worker: int,
    num_workers: int,
    worker_state: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    trainer_state: dict[str, Any] | None = None,
    teacher_states: dict[int, dict[str, torch.Tensor]] | None = None,
    group: Any = None,
    keep: int = 2,
) -> str:
    """Every rank of the replica calls this; the first rank (worker 0) passes the model,
    trainer state and its teachers' weights (so a resume needs nothing from the exchange).
    Returns the checkpoint folder."""
    folder = replica_dir(root, replica)
    final = os.path.join(folder, f"{step:010d}")
    staging = os.path.join(folder, f".staging-{step:010d}")
    if worker == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier(group)
    _write_atomic(os.path.join(staging, f"worker-{worker}.pt"), _torch_bytes(worker_state))
    if worker == 0:
        if model_state is None or trainer_state is None:
            raise ValueError("the replica's first rank must pass model_state and trainer_state")
        _write_atomic(os.path.join(staging, "model.safetensors"),
                      st_save({k: v.detach().cpu().contiguous() for k, v in model_state.items()}))
        _write_atomic(os.path.join(staging, "trainer.pt"), _torch_bytes(trainer_state))
        for peer, state in (teacher_states or {}).items():
            _write_atomic(os.path.join(staging, f"teacher-{peer}.safetensors"),
                          st_save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
    _barrier(group)
    if worker == 0:
        files = sorted(os.listdir(staging))
        expected = {"model.safetensors", "trainer.pt"} | {f"worker-{w}.pt" for w in range(num_workers)}
        expected |= {f"teacher-{p}.safetensors" for p in (teacher_states or {})}
        if set(files) != expected:
            raise RuntimeError(f"checkpoint {staging}: expected files {sorted(expected)}, found {files}")
        sums = {}
        for name in files:
            with open(os.path.join(staging, name), "rb") as f:
                sums[name] = hashlib.sha256(f.read()).hexdigest()
        manifest = {"format": FORMAT, "replica": replica, "step": step, "workers": num_workers,
                    "sha256": sums}
        _write_atomic(os.path.join(staging, "manifest.json"), json.dumps(manifest, indent=1).encode())
        _fsync_dir(staging)
        if os.path.exists(final):  # a checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(folder)
        for old in list_checkpoints(root, replica)[:-keep]:
            shutil.rmtree(os.path.join(folder, f"{old:010d}"), ignore_errors=True)
    _barrier(group)
    return final


def list_checkpoints(root: str, replica: int) -> list[int]:
    """Steps of the checkpoint folders of ``replica``, oldest first (validity not checked)."""
    folder = replica_dir(root, replica)
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


@dataclass
class Checkpoint:
    step: int
    model_state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]
    worker_state: dict[str, Any]
    teacher_states: dict[int, dict[str, torch.Tensor]]


def _verify(folder: str, worker: int) -> str | None:
    """None if the checkpoint in ``folder`` is complete and intact, else the problem."""
    try:
        with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            return "not a codistill checkpoint manifest"
        if f"worker-{worker}.pt" not in manifest["sha256"]:
            return (f"it was written by {manifest.get('workers')} workers per replica; "
                    f"worker {worker} has no state in it")
        for name, digest in manifest["sha256"].items():
            if not _FILE.fullmatch(name):
                return f"unexpected file name {name!r} in the manifest"
            with open(os.path.join(folder, name), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    return f"{name} fails its checksum"
    except (OSError, ValueError, KeyError) as e:
        return str(e)
    return None


def valid_steps(root: str, replica: int, worker: int = 0) -> list[int]:
    """Steps of ``replica``'s checkpoints that pass verification, oldest first."""
    out = []
    for step in list_checkpoints(root, replica):
        folder = os.path.join(replica_dir(root, replica), f"{step:010d}")
        problem = _verify(folder, worker)
        if problem is None:
            out.append(step)
        else:
            log.warning("skipping checkpoint %s: %s", folder, problem)
    return out


def load_checkpoint(root: str, replica: int, step: int, worker: int) -> Checkpoint:
    """Load one verified checkpoint for ``worker`` of ``replica``."""
    folder = os.path.join(replica_dir(root, replica), f"{step:010d}")
    problem = _verify(folder, worker)
    if problem is not None:
        raise ValueError(f"checkpoint {folder}: {problem}")
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        model_state = st_load(f.read())
    trainer_state = torch.load(os.path.join(folder, "trainer.pt"), weights_only=True)
    worker_state = torch.load(os.path.join(folder, f"worker-{worker}.pt"), weights_only=True)
    teachers = {}
    for name in os.listdir(folder):
        if name.startswith("teacher-") and name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                teachers[int(name[len("teacher-") : -len(".safetensors")])] = st_load(f.read())
    return Checkpoint(step, model_state, trainer_state, worker_state, teachers)


class Checkpointer:
    """Saves and restores one replica's full training state (every rank of the replica
    calls :meth:`save` together; each restores its own worker state)."""

    def __init__(self, root: str, replica: int, worker: int = 0, num_workers: int = 1,
                 group: Any = None, keep: int = 2, fingerprint: dict[str, Any] | None = None) -> None:
        self.root, self.replica, self.worker, self.num_workers = root, replica, worker, num_workers
        self.group, self.keep = group, keep
        self.fingerprint = fingerprint or {}

    def steps(self) -> list[int]:
        """Checkpoint steps on disk, valid or not."""
        return list_checkpoints(self.root, self.replica)

    def valid_steps(self) -> list[int]:
        return valid_steps(self.root, self.replica, self.worker)

    def clear(self) -> None:
        """Delete every checkpoint of this replica (a fresh start with --overwrite)."""
        shutil.rmtree(replica_dir(self.root, self.replica), ignore_errors=True)

    def save(self, step: int, rep: Any) -> str:
        """Write ``rep`` (a :class:`~codistill.replica.Replica`) as its checkpoint at ``step``."""
        from .exchange import cpu_state

        worker_state = {"sampler": rep.sampler.state(), "torch_rng": rep.rng_state,
                        "generator": rep.generator.get_state()}
        model_state = trainer_state = teachers = None
        if self.worker == 0:
            cd = rep.codistiller
            cd.exchange.flush()  # the version published at this step is readable before we record it
            cd_state = cd.state_dict()
            teachers = {p: t.pop("state") for p, t in cd_state["teachers"].items()}
            model_state = cpu_state(rep.model)
            trainer_state = {"step": step, "optimizer": rep.optimizer.state_dict(),
                             "scheduler": rep.scheduler.state_dict(), "codistiller": cd_state,
                             "fingerprint": self.fingerprint}
            if rep.outer is not None:
                trainer_state["outer"] = rep.outer.state_dict()
        return save_checkpoint(self.root, self.replica, step, self.worker, self.num_workers,
                               worker_state, model_state, trainer_state, teachers, self.group, self.keep)

    def restore(self, step: int, rep: Any) -> None:
        """Load the checkpoint at ``step`` into ``rep``; a changed setting is a ConfigError."""
        from .config import ConfigError
        from .exchange import unwrap

        ck = load_checkpoint(self.root, self.replica, step, self.worker)
        saved = ck.trainer_state.get("fingerprint", {})
        changed = sorted(k for k, v in self.fingerprint.items() if k in saved and saved[k] != v)
        if changed:
            raise ConfigError(f"--resume: the checkpoint at step {step} was written with different "
                              f"{', '.join(changed)} ({', '.join(f'{k}={saved[k]}' for k in changed)}); "
                              "resume with the same settings or start a new run")
        unwrap(rep.model).load_state_dict(ck.model_state)
        rep.optimizer.load_state_dict(ck.trainer_state["optimizer"])
        rep.scheduler.load_state_dict(ck.trainer_state["scheduler"])
        cd_state = ck.trainer_state["codistiller"]
        for peer, t in cd_state["teachers"].items():
            t["state"] = ck.teacher_states[int(peer)]
        rep.codistiller.load_state_dict(cd_state)
        if rep.outer is not None:
            rep.outer.load_state_dict(ck.trainer_state["outer"])
        rep.sampler.load_state(ck.worker_state["sampler"])
        rep.rng_state = ck.worker_state["torch_rng"]
        rep.generator.set_state(ck.worker_state["generator"])
