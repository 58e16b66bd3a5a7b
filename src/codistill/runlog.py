"""The run log: metric rows written to ``RUN_DIR/metrics*.jsonl`` (mirrored to TensorBoard),
read back, and the curves and steps-to-target taken from them."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from typing import Any

from ._extras import require
from .files import atomic_write

log = logging.getLogger(__name__)


class RunDirError(ValueError):
    """The run directory already holds another run's metrics."""


class MetricsWriter:
    """Writes metric rows to ``RUN_DIR/metrics.jsonl`` and mirrors them to TensorBoard.

    An existing metrics file is an error unless ``overwrite`` (start afresh) or
    ``resume_step`` (keep the rows up to that step, drop later ones, which the resumed run
    writes again) is given, so one run's metrics are never mixed into another's.
    """

    def __init__(self, run_dir: str, filename: str = "metrics.jsonl", tensorboard: bool = True,
                 tb_subdir: str = "", overwrite: bool = False, resume_step: int | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, filename)
        tb_dir = os.path.join(run_dir, "tensorboard", tb_subdir)
        if os.path.exists(self.path):
            if resume_step is not None:
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            elif overwrite:
                os.remove(self.path)
                shutil.rmtree(tb_dir, ignore_errors=True)
            else:
                raise RunDirError(f"{self.path} already holds a run's metrics: pass --overwrite to "
                                  "replace them, --resume to continue, or choose another --out")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            require("tensorboard", "TensorBoard logging")
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(tb_dir, purge_step=purge)

    def write(self, row: dict[str, Any]) -> None:
        """Write one row: ``step``, ``kind`` (train/eval/ensemble/churn), ``replica`` and values."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is None:
            return
        who = row.get("replica")
        suffix = f"/replica{who}" if isinstance(who, int) else ""
        for key, value in row.items():
            if key in ("step", "replica", "kind") or not isinstance(value, (int, float)):
                continue
            if isinstance(value, bool):
                continue
            self._tb.add_scalar(f"{row['kind']}/{key}{suffix}", value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL file (or of every ``metrics*.jsonl`` in a run directory). A
    last line cut off by a crash while it was written (no newline, not JSON) is left out
    with a warning; any other line that is not a JSON row is an error naming it."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.startswith("metrics") and f.endswith(".jsonl"))
        if not files:
            raise FileNotFoundError(f"{path}: no metrics*.jsonl in this run directory")
        return [r for f in files for r in read_metrics(os.path.join(path, f))]
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) and not raw.endswith("\n"):
                log.warning("%s:%d: a row cut off while it was written (left out)", path, n)
                continue
            raise ValueError(f"{path}:{n}: not a JSON row ({e.msg})") from e
    return rows


def eval_curve(rows: list[dict[str, Any]], replica: int | str, key: str = "loss") -> list[tuple[int, float]]:
    """``[(step, value)]`` of eval rows for one replica (or ``"ensemble"``), by step."""
    kind = "ensemble" if replica == "ensemble" else "eval"
    pts = {r["step"]: r[key] for r in rows
           if r.get("kind") == kind and r.get("replica") == replica and key in r}
    return sorted(pts.items())


def steps_to_target(curve: Sequence[tuple[int, float]], target: float,
                    higher_is_better: bool = False) -> int | None:
    """The first evaluated step whose value reaches ``target`` (at or below it for a loss, at
    or above it for an accuracy with ``higher_is_better``); None if never."""
    for step, value in curve:
        if (value >= target) if higher_is_better else (value <= target):
            return step
    return None
