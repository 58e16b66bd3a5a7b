"""Full resumable checkpoints of one replica, written atomically.

Layout under ``RUN_DIR/checkpoints/replica-R/``::

    0000000200/state/              Distributed Checkpoint (torch.distributed.checkpoint): the
                                   model, the optimizer and the teachers, each rank writing
                                   its own shards (a tensor every rank holds whole: once)
    0000000200/trainer.pt          what every rank of the replica shares (LR schedule, teacher
                                   versions, counters), the step, the fingerprint and the run's
                                   resolved config (first rank)
    0000000200/worker-W.pt         each worker's own state (data position, RNG states)
    0000000200/manifest.json       sha256 of every file; written last

One format for every layout: a whole model (engine, DDP) and a sharded one (FSDP2) are both
saved with the distributed state-dict APIs, so no rank gathers what it does not hold, and a
checkpoint loads back into the layout that wrote it. Files are first written into a hidden
staging folder, which the first rank renames to the step's name once every rank's files are
in and the manifest is written: a checkpoint folder either is complete or does not exist.
Ctrl-C while a checkpoint is written takes effect once it is complete (a second one at once).
Loading verifies the checksums and falls back to the previous checkpoint if the newest is
damaged. What a checkpoint holds is the replica's to say (:class:`State`, from
:meth:`~codistill.replica.Replica.state`); this module only stages, writes, checksums,
verifies and prunes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .files import atomic_write, fsync_dir, sha256_file

log = logging.getLogger(__name__)

FORMAT = "codistill-checkpoint/2"
_FILE = re.compile(r"trainer\.pt|worker-\d+\.pt|state/(\.metadata|__\d+_\d+\.distcp)")


def _barrier(group: Any) -> None:
    if dist.is_initialized() and group is not None:
        dist.barrier(group=group)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _files(folder: str) -> list[str]:
    """Every file under ``folder``, as relative paths with ``/``."""
    out = []
    for root, _, names in os.walk(folder):
        rel = os.path.relpath(root, folder)
        out += [name if rel == "." else f"{rel}/{name}".replace(os.sep, "/") for name in names]
    return sorted(out)


def _dcp(op: Any, state: dict[str, Any], group: Any, **kwargs: Any) -> Any:
    """``dcp.save`` / ``dcp.load`` over the replica's group, or in this process alone."""
    if dist.is_initialized() and group is not None:
        return op(state, process_group=group, **kwargs)
    with warnings.catch_warnings():  # one process on purpose: DCP's warning about it is noise
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return op(state, no_dist=True, **kwargs)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then act on it; a second one acts at
    once (the previous handler is back). Main thread only; a no-op if SIGINT is ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    caught: list[int] = []

    def hold(signum: int, _frame: Any) -> None:
        caught.append(signum)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


def replica_dir(root: str, replica: int) -> str:
    return os.path.join(root, f"replica-{replica}")


def save_checkpoint(root: str, replica: int, step: int, worker: int, num_workers: int,
                    worker_state: dict[str, Any], state: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None, group: Any = None, keep: int = 2) -> str:
    """Every rank of the replica calls this with its worker state and the replica's
    ``state`` (model, optimizer and teachers as the distributed state-dict APIs give them);
    the first rank (worker 0) also passes the trainer state. Returns the checkpoint folder."""
    with _sigint_deferred():
        return _save(root, replica, step, worker, num_workers, worker_state, state, trainer_state,
                     group, keep)


def _save(root: str, replica: int, step: int, worker: int, num_workers: int, worker_state: dict[str, Any],
          state: dict[str, Any], trainer_state: dict[str, Any] | None, group: Any, keep: int) -> str:
    import torch.distributed.checkpoint as dcp

    folder = replica_dir(root, replica)
    final = os.path.join(folder, f"{step:010d}")
    staging = os.path.join(folder, f".staging-{step:010d}")
    if worker == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier(group)
    atomic_write(os.path.join(staging, f"worker-{worker}.pt"), _torch_bytes(worker_state))
    _dcp(dcp.save, state, group, storage_writer=dcp.FileSystemWriter(os.path.join(staging, "state")))
    if worker == 0:
        if trainer_state is None:
            raise ValueError("the replica's first rank must pass trainer_state")
        atomic_write(os.path.join(staging, "trainer.pt"), _torch_bytes(trainer_state))
    _barrier(group)
    if worker == 0:
        files = _files(staging)
        expected = {"trainer.pt", "state/.metadata"} | {f"worker-{w}.pt" for w in range(num_workers)}
        missing = sorted(expected - set(files))
        if missing:
            raise RuntimeError(f"checkpoint {staging}: files {missing} are missing")
        sums = {name: sha256_file(os.path.join(staging, name)) for name in files}
        manifest = {"format": FORMAT, "replica": replica, "step": step, "workers": num_workers,
                    "sha256": sums}
        atomic_write(os.path.join(staging, "manifest.json"), json.dumps(manifest, indent=1).encode())
        fsync_dir(os.path.join(staging, "state"))
        fsync_dir(staging)
        if os.path.exists(final):  # a checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(folder)
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


def _verify(folder: str, worker: int) -> str | None:
    """None if the checkpoint in ``folder`` is complete and intact, else the problem."""
    try:
        with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            return f"not a {FORMAT} manifest (written by another version of codistill?)"
        if f"worker-{worker}.pt" not in manifest["sha256"]:
            return (f"it was written by {manifest.get('workers')} workers per replica; "
                    f"worker {worker} has no state in it")
        for name, digest in manifest["sha256"].items():
            if not _FILE.fullmatch(name):
                return f"unexpected file name {name!r} in the manifest"
            if sha256_file(os.path.join(folder, name)) != digest:
                return f"{name} fails its checksum"
    except (OSError, ValueError, KeyError, AttributeError) as e:
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


def read_state(folder: str) -> dict[str, Any]:
    """A checkpoint folder's ``state/`` as whole CPU tensors in one process (``model``,
    ``optimizer``, ``teachers``): to inspect a checkpoint or take its weights elsewhere."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        dcp_to_torch_save(os.path.join(folder, "state"), path)
        return torch.load(path, weights_only=True)


@dataclass
class State:
    """What a checkpoint holds of one replica, as one rank gives it: ``tensors`` through the
    distributed state-dict APIs (whole or sharded as laid out, shared with the modules: DCP,
    each rank its shards), ``shared`` (the same on every rank: written by the first),
    ``worker`` (this rank's own)."""

    tensors: dict[str, Any]
    shared: dict[str, Any]
    worker: dict[str, Any]


@dataclass
class Saved:
    """A verified checkpoint, read back: ``shared`` and ``worker`` as saved (``shared`` with the
    step, fingerprint and config), the tensors read on demand into a template of them."""

    folder: str
    shared: dict[str, Any]
    worker: dict[str, Any]
    group: Any = None

    def read_tensors(self, into: dict[str, Any]) -> None:
        """Load the checkpoint's tensors into ``into`` in place (the layout of a :class:`State`'s
        ``tensors``: each rank reads what it holds)."""
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(os.path.join(self.folder, "state"))
        _dcp(dcp.load, into, self.group, storage_reader=reader)


class Checkpointer:
    """Stages, writes, checksums and prunes one replica's checkpoints (every rank of the
    replica calls :meth:`save` and :meth:`load` together); what they hold is the replica's
    (:meth:`~codistill.replica.Replica.state`)."""

    def __init__(self, root: str, replica: int, worker: int = 0, num_workers: int = 1,
                 group: Any = None, keep: int = 2, fingerprint: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.root, self.replica, self.worker, self.num_workers = root, replica, worker, num_workers
        self.group, self.keep = group, keep
        self.fingerprint = fingerprint or {}
        self.config = config  # the run's resolved config, saved with each checkpoint

    def saved_config(self, step: int) -> dict[str, Any] | None:
        """The resolved config the checkpoint at ``step`` was written with (None if it predates
        configs in checkpoints)."""
        folder = os.path.join(replica_dir(self.root, self.replica), f"{step:010d}")
        return torch.load(os.path.join(folder, "trainer.pt"), weights_only=True).get("config")

    def steps(self) -> list[int]:
        """Checkpoint steps on disk, valid or not."""
        return list_checkpoints(self.root, self.replica)

    def valid_steps(self) -> list[int]:
        return valid_steps(self.root, self.replica, self.worker)

    def clear(self) -> None:
        """Delete every checkpoint of this replica (a fresh start with --overwrite)."""
        shutil.rmtree(replica_dir(self.root, self.replica), ignore_errors=True)

    def save(self, step: int, state: State) -> str:
        """Write ``state`` as the checkpoint at ``step``; returns its folder."""
        shared = None
        if self.worker == 0:
            shared = {"step": step, **state.shared, "fingerprint": self.fingerprint, "config": self.config}
        return save_checkpoint(self.root, self.replica, step, self.worker, self.num_workers,
                               state.worker, state.tensors, shared, self.group, self.keep)

    def load(self, step: int) -> Saved:
        """The checkpoint at ``step``, verified; a changed fingerprint setting is a ConfigError."""
        from .config import ConfigError

        folder = os.path.join(replica_dir(self.root, self.replica), f"{step:010d}")
        problem = _verify(folder, self.worker)
        if problem is not None:
            raise ValueError(f"checkpoint {folder}: {problem}")
        shared = torch.load(os.path.join(folder, "trainer.pt"), weights_only=True)
        saved = shared.get("fingerprint", {})
        changed = sorted(k for k, v in self.fingerprint.items() if k in saved and saved[k] != v)
        if changed:
            raise ConfigError(f"--resume: the checkpoint at step {step} was written with different "
                              f"{', '.join(changed)} ({', '.join(f'{k}={saved[k]}' for k in changed)}); "
                              "resume with the same settings or start a new run")
        worker = torch.load(os.path.join(folder, f"worker-{self.worker}.pt"), weights_only=True)
        return Saved(folder, shared, worker, self.group)
