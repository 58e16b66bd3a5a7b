"""Run configuration: one YAML file describes a run; every error names the field.

The sections are written with the schema toolkit of :mod:`codistill.settings` (settings
carry their own rules), as is a task's ``data:`` section, defined next to the task; the task
is found by name (:func:`~codistill.settings.task_schema`), so this module imports no task.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .settings import (
    ConfigError,
    DataSettings,
    TaskSchema,
    build,
    check_settings,
    check_type,
    setting,
    task_schema,
)

log = logging.getLogger(__name__)

# The toolkit's names stay importable from here (``from codistill.config import ConfigError``).
__all__ = [
    "CheckpointConfig", "CodistillConfig", "ConfigError", "DataSettings", "EvalConfig",
    "OptimizerConfig", "OuterConfig", "RunConfig", "TaskSchema", "apply_overrides",
    "check_settings", "dump_config", "from_dict", "load_config", "parse_override", "setting",
    "validate",
]


@dataclass
class OptimizerConfig:
    name: str = setting("adam", choices=("adam", "adamw", "sgd"))
    lr: float = setting(2e-3, gt=0)
    weight_decay: float = setting(0.0, ge=0)
    momentum: float = setting(0.9, ge=0)  # sgd only
    grad_clip: float = setting(1.0, ge=0)  # 0 turns clipping off
    warmup: int = setting(0, ge=0)  # linear warm-up steps
    schedule: str = setting("constant", choices=("constant", "cosine"))


@dataclass
class CodistillConfig:
    alpha: float = setting(1.0, ge=0)
    burn_in: int = setting(0, ge=0)  # B
    ramp: int = setting(0, ge=0)  # steps for α to rise linearly after burn-in
    exchange_every: int = setting(50, gt=0)  # K
    distill: str = setting("auto", choices=("auto", "kl", "ce", "bce"))  # auto: from the task's output
    temperature: float = setting(1.0, gt=0)
    exchange: str = "memory"  # memory | collective | a directory | file:// or fsspec URL
    keep: int = setting(3, gt=0)  # versions kept per replica in the exchange
    sync: bool = False  # distributed: wait for every peer's version of this step (lock-step)
    sync_timeout: float = setting(600.0, gt=0)  # seconds to wait for a peer in sync or max_drift mode
    max_drift: int = setting(0, ge=0)  # async: run at most this many steps ahead of the slowest peer (0: off)
    teachers_from: str | None = None  # a finished run: distil from its final replicas (offline)
    # A peer's published weights may be at most this multiple of the largest model the run
    # declares (checked before they are read: the exchange is untrusted input).
    max_teacher_size: float = setting(4.0, ge=1)
    # dtype teachers are stored and run in (auto: the run's precision); a version is decoded into it
    teacher_dtype: str = setting("auto", choices=("auto", "fp32", "bf16"))
    # how a version stores the weights (docs/compression.md): fp32 as the model holds them, bf16
    # (half the bytes), int8 (per output channel, symmetric; about a quarter)
    publish_dtype: str = setting("fp32", choices=("fp32", "bf16", "int8"))
    # under parallel: fsdp, shard each teacher across the replica's ranks like the student
    shard_teachers: bool = True
    # Signed versions (docs/security.md): a file holding the key every replica shares (hex;
    # default: the CODISTILL_EXCHANGE_KEY variable), and the run id written into every version
    # (peers' versions of another run id are rejected; default: CODISTILL_RUN_ID, else NAME-seedSEED).
    exchange_key_file: str | None = None
    run_id: str | None = None


@dataclass
class OuterConfig:
    """Weight averaging across replicas every ``every`` steps (0: off): local SGD with lr 1
    and momentum 0, DiLoCo with lr 0.7 and Nesterov momentum 0.9. One-process engine only."""

    every: int = setting(0, ge=0)
    lr: float = setting(1.0, gt=0)
    momentum: float = setting(0.0, ge=0, lt=1)


@dataclass
class EvalConfig:
    every: int = setting(50, gt=0)
    batch_size: int = setting(64, gt=0)
    max_batches: int = setting(0, ge=0)  # 0 evaluates the whole validation split


@dataclass
class CheckpointConfig:
    every: int = setting(0, ge=0)  # C: full resumable checkpoint every C steps (0: only at the end)
    keep: int = setting(2, gt=0)


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = setting(0, ge=0)
    steps: int = setting(500, gt=0)
    replicas: int = setting(2, gt=0)  # N; 1 is the sync-SGD baseline
    workers: int = setting(1, gt=0)  # W, simulated in one process by a W×b batch
    batch_size: int = setting(32, gt=0)  # b, per worker
    device: str = "cpu"
    threads: int = setting(0, ge=0)  # torch intra-op threads; 0 leaves torch's default
    log_every: int = setting(10, gt=0)
    label_smoothing: float = setting(0.0, ge=0, lt=1)  # ε: φ toward (1-ε)·labels + ε·uniform
    # A step with non-finite gradients: stop the run (naming the step and the last good
    # checkpoint) or skip its batch (counted in the metrics; checks every step, a host sync).
    on_nonfinite: str = setting("stop", choices=("stop", "skip"))
    # Stop when the training loss since the last log exceeds this × the first step's (0: off).
    diverge_factor: float = setting(10.0, ge=0)
    task: str = "lm"  # lm | image | click | module:Class
    model: dict[str, Any] = field(default_factory=dict)  # empty: the task's default model
    replica_models: list[dict[str, Any]] | None = None  # per replica, merged over `model`
    data: DataSettings = field(default_factory=DataSettings)  # the task's own dataclass
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    backend: str = setting("auto", choices=("auto", "gloo", "nccl"))  # auto: nccl on CUDA, else gloo
    dist_timeout: float = setting(1800.0, gt=0)  # seconds before a stalled collective fails the run
    parallel: str = setting("ddp", choices=("ddp", "fsdp"))  # a replica's layout over its W ranks
    precision: str = setting("fp32", choices=("fp32", "bf16"))  # bf16: the student's forward under autocast

    def replica_model(self, replica: int) -> dict[str, Any]:
        """The model spec of ``replica``: ``model`` with that replica's overrides."""
        if not self.replica_models:
            return dict(self.model)
        over = self.replica_models[replica]
        if "name" in over and over["name"] != self.model.get("name"):
            return dict(over)
        return {**self.model, **over}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(cfg: RunConfig) -> RunConfig:
    """Check ranges and cross-field rules; resolve ``codistill.distill: auto``; raise
    :class:`ConfigError` naming the field."""
    task = task_schema(cfg.task)
    if "name" not in cfg.model:
        raise ConfigError("model.name is required")
    if cfg.replica_models is not None and len(cfg.replica_models) != cfg.replicas:
        raise ConfigError(
            f"replica_models has {len(cfg.replica_models)} entries but replicas is {cfg.replicas}"
        )
    check_settings(cfg)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if cfg.backend == "nccl" and not cfg.device.startswith("cuda"):
        raise ConfigError("backend 'nccl' needs device: cuda (use gloo on CPU)")
    c = cfg.codistill
    kinds = ("bce",) if task.output == "binary" else ("kl", "ce")
    if c.distill == "auto":
        c.distill = kinds[0]
    elif c.distill not in kinds:
        raise ConfigError(f"codistill.distill {c.distill!r} does not fit task {cfg.task!r}, whose "
                          f"outputs are {task.output}: use one of {list(kinds)}")
    if cfg.replicas > 1 and c.alpha > 0 and c.burn_in >= cfg.steps:
        log.warning("codistill.burn_in (%d) >= steps (%d): distillation never switches on",
                    c.burn_in, cfg.steps)
    if c.keep < 2 and c.exchange not in ("memory", "collective"):
        raise ConfigError("codistill.keep must be >= 2 for a directory exchange")
    if c.teachers_from and (cfg.replicas != 1 or cfg.outer.every):
        raise ConfigError("codistill.teachers_from (offline distillation from a finished run) needs "
                          "replicas: 1 and no outer.every")
    if cfg.outer.every and cfg.replicas < 2:
        raise ConfigError("outer.every (weight averaging) needs replicas >= 2")
    task.check_config(cfg)
    return cfg


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a config from plain values (as loaded from YAML)."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping, got {values!r}")
    name = check_type(values.get("task", "lm"), str, "task")
    task = task_schema(name)
    cfg = build(RunConfig, values, "", {"data": task.Data})
    if "data" not in values:
        cfg.data = task.Data()
    if not cfg.model:
        cfg.model = dict(task.default_model)
    return validate(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"codistill.alpha=0.5"`` → ``(["codistill", "alpha"], 0.5)`` (value parsed as YAML)."""
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw config mapping (in place) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        node = values
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {'.'.join(path[: i + 1])} is not a mapping")
            node = child
        node[path[-1]] = value
    return values


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply ``--set`` overrides, validate."""
    values: dict[str, Any] = {}
    if path:
        if os.path.isdir(path):
            raise ConfigError(f"{path} is a directory, not a config file")
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8)") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
        if values is None:  # empty, or comments only: not a run of every default
            raise ConfigError(f"{path}: the config file is empty (write `{{}}` in it to run every default)")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config fields")
    return from_dict(apply_overrides(values, overrides or []))


def dump_config(cfg: RunConfig, path: str, header: str = "") -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(header)
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
