"""Tasks: what differs between problems (data, model, φ, output kind, metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..settings import BUILTIN_TASKS as BUILTIN
from ..settings import task_schema
from .base import Batch, Task

if TYPE_CHECKING:
    from ..config import RunConfig


def task_class(name: str) -> type[Task]:
    """The Task class for ``task:`` — a built-in name, ``package.module:Class`` or
    ``path/to/file.py:Class``."""
    return task_schema(name, Task)  # type: ignore[return-value]  # a Task subclass


def build_task(cfg: RunConfig) -> Task:
    """Load the data of ``cfg.task`` (errors name the file or the ``data.*`` field)."""
    return task_class(cfg.task)(cfg.data)


__all__ = ["BUILTIN", "Batch", "Task", "build_task", "task_class"]
