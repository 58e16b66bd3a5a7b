"""The schema toolkit every config section is written with (a leaf: no codistill imports).

A setting carries its own rules (``setting(default, choices=..., gt=..., ge=..., lt=...)``),
so a task's ``data:`` section, defined next to the task, is built and checked like the run
config's own sections. :class:`TaskSchema` is what a run config needs of a task (its
``data:`` dataclass, output kind, default model, cross-field rules), and :func:`task_schema`
finds a task's class by name, by import path, without this module importing any task.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def setting(default: Any, *, choices: tuple | None = None, gt: float | None = None,
            ge: float | None = None, lt: float | None = None, text: bool = False) -> Any:
    """A config field with its rules: allowed ``choices`` and bounds (checked when loaded).
    ``text``: a name or names (of columns, say) whose numbers — what YAML makes of an unquoted
    ``4`` or ``1.5`` — are read as strings."""
    meta = {k: v for k, v in (("choices", choices), ("gt", gt), ("ge", ge), ("lt", lt)) if v is not None}
    if text:
        meta["text"] = True
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataSettings:
    """Settings every task's ``data:`` section has; a task subclasses it with its own."""

    shards: str = setting("disjoint", choices=("disjoint", "shared"))  # across replicas


def check_type(value: Any, tp: Any, name: str) -> Any:
    """``value`` as type ``tp`` (ints widen to float, YAML's ``1e-3`` string reads as a float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return check_type(value, inner, name)
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
        return [check_type(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
    want = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")


def as_text(value: Any, name: str) -> Any:
    """``value`` with its numbers (also in a list) as strings; a YAML boolean is a ConfigError."""
    if isinstance(value, list):
        return [as_text(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be str, got {value!r} (YAML reads an unquoted yes/no/on/off/"
                          f"true/false as a boolean: quote it)")
    return str(value) if isinstance(value, (int, float)) else value


def build(cls: type, values: Any, prefix: str, types_: dict[str, type] | None = None) -> Any:
    """An instance of the config dataclass ``cls`` from plain values (``types_`` overrides the
    type of some fields, e.g. ``data`` by the task's own dataclass)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = {**typing.get_type_hints(cls), **(types_ or {})}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config field '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, f"{prefix}{key}.")
            continue
        if fields[key].metadata.get("text"):
            value = as_text(value, f"{prefix}{key}")
        kwargs[key] = check_type(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def check_settings(obj: Any, prefix: str = "") -> None:
    """Check every field's rules (``setting``) in a config dataclass and its sections."""
    for f in dataclasses.fields(obj):
        name, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_settings(value, f"{name}.")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
        rules = f.metadata
        if "choices" in rules and value not in rules["choices"]:
            raise ConfigError(f"{name} must be one of {list(rules['choices'])}, got {value!r}")
        if value is None or isinstance(value, (str, bool)):
            continue
        if "gt" in rules and not value > rules["gt"]:
            raise ConfigError(f"{name} must be > {rules['gt']:g}, got {value!r}")
        if "ge" in rules and not value >= rules["ge"]:
            raise ConfigError(f"{name} must be >= {rules['ge']:g}, got {value!r}")
        if "lt" in rules and not value < rules["lt"]:
            raise ConfigError(f"{name} must be < {rules['lt']:g}, got {value!r}")


# -- tasks, as the run config sees them ---------------------------------------------------------


class TaskSchema:
    """What a run config needs of a task: the dataclass of its ``data:`` section (a subclass
    of :class:`DataSettings`), the kind of its ``output`` (``"categorical"`` or ``"binary"``,
    which decides ψ), its ``default_model`` and its cross-field rules. ``codistill.tasks.Task``
    is the whole task."""

    Data: ClassVar[type[DataSettings]] = DataSettings
    output: ClassVar[str] = "categorical"
    default_model: ClassVar[dict[str, Any]] = {}

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Cross-field rules between ``data`` and ``model``; raise ConfigError naming a field."""


BUILTIN_TASKS = {
    "lm": "codistill.tasks.lm:LMTask",
    "image": "codistill.tasks.image:ImageTask",
    "click": "codistill.tasks.click:ClickTask",
}

def task_schema(name: str, base: type[TaskSchema] = TaskSchema) -> type[TaskSchema]:
    """The task class for ``task:`` — a built-in name, ``package.module:Class`` or
    ``path/to/file.py:Class`` — which must subclass ``base``."""
    path = BUILTIN_TASKS.get(name, name)
    module_name, colon, cls_name = path.rpartition(":")
    if not colon or not module_name or not cls_name:
        raise ConfigError(f"task must be one of {sorted(BUILTIN_TASKS)}, 'package.module:Class' or "
                          f"'file.py:Class', got {name!r}")
    try:
        module = _import(module_name)
    except (ImportError, OSError) as e:
        raise ConfigError(f"task {name!r}: cannot import {module_name!r} ({e})") from e
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"task {name!r}: {cls_name} in {module_name} is not a codistill Task subclass")
    return cls


def _import(module_name: str) -> ModuleType:
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = os.path.abspath(module_name)
    key = f"codistill_user_task_{abs(hash(path))}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None or not os.path.exists(path):
        raise ImportError(f"no such file {module_name!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
