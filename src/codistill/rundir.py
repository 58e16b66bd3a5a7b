"""The run directory: start-up safety, the resolved config, metric files, weights, summary.

::

    RUN_DIR/config.yaml                 resolved config
    RUN_DIR/config.resume-STEP.yaml     the config a run resumed with at STEP, if it changed
    RUN_DIR/metrics.jsonl               one-process runs (every replica, ensemble, churn)
    RUN_DIR/metrics-replicaR.jsonl      distributed runs: one file per replica
    RUN_DIR/tensorboard/...             the same scalars
    RUN_DIR/replica-R/model.safetensors final weights (metadata: model spec)
    RUN_DIR/summary*.json               wall time, final evaluation, bytes exchanged
    RUN_DIR/checkpoints/replica-R/STEP/ full resumable checkpoints (checkpoint.py)
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import Checkpointer
from .config import ConfigError, RunConfig, dump_config
from .exchange import Exchange, Published
from .files import atomic_write
from .runlog import MetricsWriter, RunDirError

log = logging.getLogger(__name__)


class RunDir:
    """One process's view of a run directory. ``suffix`` names its files: ``""`` for a
    one-process run, ``"-replicaR"`` for replica R of a distributed run."""

    def __init__(self, path: str, suffix: str = "") -> None:
        self.path = path
        self.suffix = suffix
        self.writer: MetricsWriter | None = None

    def open(self, cfg: RunConfig, checkpointers: list[Checkpointer], exchange: Exchange,
             replicas: list[int], resume_step: int | None, overwrite: bool, write_config: bool,
             changes: dict[str, tuple[Any, Any]] | None = None) -> None:
        """Refuse to mix runs, then write the config and open the metric files.

        A fresh start (``resume_step`` None) refuses metrics, checkpoints or exchange
        versions of these replicas from an earlier run (peers would distil from them)
        unless ``overwrite``, which deletes them. A resumed run keeps ``config.yaml`` and
        records a config with ``changes`` (:func:`plan_resume`) next to it."""
        os.makedirs(self.path, exist_ok=True)
        if resume_step is None:
            if exchange.durable:
                for r in replicas:
                    check_fresh_exchange(exchange, r, overwrite)
            for ck in checkpointers:
                if ck.steps():
                    if not overwrite:
                        raise RunDirError(f"{ck.root} holds checkpoints of replica {ck.replica}: pass "
                                          "--resume to continue or --overwrite to start afresh")
                    ck.clear()
        sub = f"replica-{replicas[0]}" if self.suffix else ""
        self.writer = MetricsWriter(self.path, f"metrics{self.suffix}.jsonl", tb_subdir=sub,
                                    overwrite=overwrite, resume_step=resume_step)
        if write_config:
            self._write_config(cfg, resume_step, changes or {})

    def _write_config(self, cfg: RunConfig, resume_step: int | None,
                      changes: dict[str, tuple[Any, Any]]) -> None:
        path = os.path.join(self.path, "config.yaml")
        if resume_step is None or not os.path.exists(path):
            atomic_write(path, functools.partial(dump_config, cfg))
        elif changes:
            record = os.path.join(self.path, f"config.resume-{resume_step}.yaml")
            diff = describe_changes(changes)
            header = f"# resumed at step {resume_step} with: {diff}\n"
            atomic_write(record, lambda tmp: dump_config(cfg, tmp, header=header))
            log.warning("resumed at step %d with a changed config: %s (the config up to step %d is in %s, "
                        "the one from then on in %s)", resume_step, diff, resume_step, path, record)

    def write(self, row: dict[str, Any]) -> None:
        assert self.writer is not None, "RunDir.open() first"
        self.writer.write(row)

    def save_weights(self, replica: int, state: dict[str, Any], spec: dict[str, Any]) -> str:
        """Final weights of ``replica`` (a whole CPU state) with its model spec in the file's
        metadata."""
        folder = os.path.join(self.path, f"replica-{replica}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "model.safetensors")
        # whole or absent, even after a Ctrl-C
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"model": json.dumps(spec)}))

    def write_summary(self, summary: dict[str, Any]) -> str:
        path = os.path.join(self.path, f"summary{self.suffix}.json")
        return atomic_write(path, json.dumps(summary, indent=1))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def load_weights(run_dir: str, replica: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The final weights of ``replica`` in ``run_dir`` and the model spec saved with them."""
    path = os.path.join(run_dir, f"replica-{replica}", "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no final weights (did the run finish?)")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "model" not in meta:
        raise ValueError(f"{path}: no model spec in its metadata")
    return state, json.loads(meta["model"])


def check_fresh_exchange(exchange: Exchange, replica: int, overwrite: bool) -> None:
    """A replica starting afresh must not find versions of its own from an earlier run in
    the exchange (its peers would distil from them); ``overwrite`` deletes them."""
    old = exchange.versions(replica)
    if not old:
        return
    if not overwrite:
        raise RunDirError(f"the exchange already holds versions {old} of replica {replica} from an "
                          "earlier run: pass --resume to continue it, --overwrite to delete them, "
                          "or use another exchange location")
    log.warning("deleting versions %s of replica %d from the exchange (--overwrite)", old, replica)
    exchange.clear(replica)


# Fields a --resume may change without --allow-changes. None changes what a step computes:
# where the run is placed (threads, backend, the exchange location: a moved run directory),
# how often it logs and checkpoints and how many files it keeps, the limits that decide
# when it gives up (the cures the divergence message suggests), and the exchange key's file
# (a rotation). Every other field changes the trajectory (optimizer settings, distillation,
# schedule, steps, evaluation, device, precision, layout) or, like ``name`` and
# ``codistill.run_id`` (the run id peers check is derived from them), what peers accept:
# it needs --allow-changes.
FREE_ON_RESUME = frozenset({
    "threads", "backend", "dist_timeout", "log_every", "on_nonfinite", "diverge_factor",
    "checkpoint.every", "checkpoint.keep", "codistill.exchange", "codistill.keep",
    "codistill.sync_timeout", "codistill.max_teacher_size", "codistill.exchange_key_file",
})
# Fields (and sections) that cannot change on resume at all: the checkpoint's weights,
# optimizer state or data position depend on them (most are also in its fingerprint, which
# Checkpointer.load checks).
FIXED_ON_RESUME = ("task", "seed", "replicas", "workers", "batch_size", "data", "model", "replica_models",
                   "outer", "optimizer.name")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1}}`` → ``{"optimizer.lr": 1}`` (lists compared whole)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every field whose value differs between two configs (as plain values): ``{field: (old, new)}``.
    A field ``old`` lacks (written before the field was added) reads as its default."""
    plain = [_flat(yaml.safe_load(yaml.safe_dump(v))) for v in (old, new)]  # tuples, ints vs floats
    missing = object()
    before = {**{k: v for k, v in _defaults().items() if k in plain[1]}, **plain[0]}
    return {k: (plain[0].get(k), plain[1].get(k)) for k in sorted(set(plain[0]) | set(plain[1]))
            if before.get(k, missing) != plain[1].get(k, missing)}


@functools.cache
def _defaults() -> dict[str, Any]:
    return _flat(yaml.safe_load(yaml.safe_dump(RunConfig().to_dict())))


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changes.items())


@dataclass
class Resume:
    """What a ``--resume`` found: the step, every changed field (old, new), and the summary of
    a run that had already finished (then nothing is to be written)."""

    step: int
    changes: dict[str, tuple[Any, Any]]
    saved: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.saved is not None

    def summary(self, worker: int = 0) -> dict[str, Any]:
        """The finished run's saved summary (final evaluation included), marked ``finished``."""
        return {**(self.saved or {}), "finished": True, "worker": worker}


def _saved_summary(path: str, suffix: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, f"summary{suffix}.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def plan_resume(cfg: RunConfig, path: str, checkpointer: Checkpointer, step: int | None,
                allow_changes: bool = False, announce: bool = True, who: str = "",
                suffix: str = "") -> Resume | None:
    """Check a resume from the checkpoint at ``step`` (None: nothing to resume) before
    anything is written. A finished run (its final checkpoint and ``summary{suffix}.json``
    of the last step: written after the final weights) is reported (``announce``: logged
    here) and left alone; a final checkpoint without that summary (a crash in between) is
    completed. A config that differs from the checkpoint's in a field outside
    :data:`FREE_ON_RESUME` is refused (a ConfigError naming each field, old → new) unless
    ``allow_changes``. ``who``: e.g. " (replica 1)", for the messages."""
    if step is None:
        return None
    old = checkpointer.saved_config(step)
    if old is None and os.path.exists(os.path.join(path, "config.yaml")):  # an older checkpoint
        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
            old = yaml.safe_load(f)
    changes = config_changes(old, cfg.to_dict()) if isinstance(old, dict) else {}
    last = step == cfg.steps and "steps" not in changes
    saved = _saved_summary(path, suffix) if last else None
    if saved is not None and saved.get("end") == cfg.steps:
        if announce:
            log.info("run %s%s is finished (its final checkpoint is step %d of %d): nothing to resume, "
                     "nothing changed in %s (to train on: --resume --set steps=MORE --allow-changes)",
                     cfg.name, who, step, cfg.steps, path)
        return Resume(step, changes, saved)
    fixed = {k: v for k, v in changes.items() if k.split(".")[0] in FIXED_ON_RESUME or k in FIXED_ON_RESUME}
    if fixed:
        raise ConfigError(f"--resume{who}: {describe_changes(fixed)}: cannot change on resume (the "
                          "checkpoint's weights, optimizer state or data position depend on it, even with "
                          "--allow-changes); resume with the same settings or start a new run")
    refused = {k: v for k, v in changes.items() if k not in FREE_ON_RESUME}
    if refused and not allow_changes:
        raise ConfigError(f"--resume{who}: the config differs from the one its checkpoint at step {step} was "
                          f"written with: {describe_changes(refused)}; resume with the same settings, pass "
                          "--allow-changes to continue with the new ones (both configs are kept), or start "
                          "a new run")
    if step >= cfg.steps and not last:
        raise ConfigError(f"--resume{who}: the checkpoint at step {step} is not before steps={cfg.steps}: "
                          "nothing to train")
    if last:
        log.warning("run %s%s: the final checkpoint (step %d) is there but not the final summary: "
                    "writing the final weights and summary", cfg.name, who, step)
    return Resume(step, changes)


def load_run_teachers(run_dir: str, first: int) -> list[Published]:
    """The final weights of every replica of the finished run ``run_dir`` as published
    versions numbered ``first, first+1, ...`` (offline distillation's fixed teachers)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"codistill.teachers_from: {run_dir} is not a run directory (no config.yaml)")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    out = []
    for r in range(int(cfg.get("replicas", 1))):
        state, spec = load_weights(run_dir, r)
        out.append(Published(first + r, int(cfg.get("steps", 0)), state, {"model": spec, "run": run_dir}))
    return out
