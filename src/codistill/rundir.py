"""The run directory: start-up safety, the resolved config, metric files, weights, summary.

::

    RUN_DIR/config.yaml                 resolved config
    RUN_DIR/metrics.jsonl               one-process runs (every replica, ensemble, churn)
    RUN_DIR/metrics-replicaR.jsonl      distributed runs: one file per replica
    RUN_DIR/tensorboard/...             the same scalars
    RUN_DIR/replica-R/model.safetensors final weights (metadata: model spec)
    RUN_DIR/summary*.json               wall time, final evaluation, bytes exchanged
    RUN_DIR/checkpoints/replica-R/STEP/ full resumable checkpoints (checkpoint.py)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import Checkpointer
from .config import RunConfig, dump_config
from .exchange import Exchange
from .metrics import MetricsWriter, RunDirError

log = logging.getLogger(__name__)


class RunDir:
    """One process's view of a run directory. ``suffix`` names its files: ``""`` for a
    one-process run, ``"-replicaR"`` for replica R of a distributed run."""

    def __init__(self, path: str, suffix: str = "") -> None:
        self.path = path
        self.suffix = suffix
        self.writer: MetricsWriter | None = None

    def open(self, cfg: RunConfig, checkpointers: list[Checkpointer], exchange: Exchange,
             replicas: list[int], resume_step: int | None, overwrite: bool, write_config: bool) -> None:
        """Refuse to mix runs, then write the config and open the metric files.

        A fresh start (``resume_step`` None) refuses metrics, checkpoints or exchange
        versions of these replicas from an earlier run (peers would distil from them)
        unless ``overwrite``, which deletes them."""
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
            dump_config(cfg, os.path.join(self.path, "config.yaml"))

    def write(self, row: dict[str, Any]) -> None:
        assert self.writer is not None, "RunDir.open() first"
        self.writer.write(row)

    def save_weights(self, replica: int, state: dict[str, Any], spec: dict[str, Any]) -> str:
        """Final weights of ``replica`` (a whole CPU state) with its model spec in the file's
        metadata."""
        folder = os.path.join(self.path, f"replica-{replica}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "model.safetensors")
        save_file(state, path, metadata={"model": json.dumps(spec)})
        return path

    def write_summary(self, summary: dict[str, Any]) -> str:
        path = os.path.join(self.path, f"summary{self.suffix}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        return path

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
