"""Tasks: what differs between problems (data, model, φ, output kind, metrics)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from ..config import ConfigError
from .base import Batch, Task

if TYPE_CHECKING:
    from ..config import RunConfig

BUILTIN = {
    "lm": "codistill.tasks.lm:LMTask",
    "image": "codistill.tasks.image:ImageTask",
    "click": "codistill.tasks.click:ClickTask",
}


def task_class(name: str) -> type[Task]:
    """The Task class for ``task:`` — a built-in name, ``package.module:Class`` or
    ``path/to/file.py:Class``."""
    path = BUILTIN.get(name, name)
    module_name, colon, cls_name = path.rpartition(":")
    if not colon or not module_name or not cls_name:
        raise ConfigError(f"task must be one of {sorted(BUILTIN)}, 'package.module:Class' or "
                          f"'file.py:Class', got {name!r}")
    try:
        module = _import(module_name)
    except (ImportError, OSError) as e:
        raise ConfigError(f"task {name!r}: cannot import {module_name!r} ({e})") from e
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
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


def build_task(cfg: RunConfig) -> Task:
    """Load the data of ``cfg.task`` (errors name the file or the ``data.*`` field)."""
    return task_class(cfg.task)(cfg.data)


__all__ = ["BUILTIN", "Batch", "Task", "build_task", "task_class"]
