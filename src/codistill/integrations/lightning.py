"""Codistillation in PyTorch Lightning (``pip install 'codistill[lightning]'``).

    from codistill.integrations.lightning import CodistillCallback, distill_loss

    class LitModel(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            return F.cross_entropy(logits, y) + distill_loss(self, x, logits)

    trainer = L.Trainer(max_steps=1000, callbacks=[CodistillCallback(exchange_every=50,
                                                                    alpha=AlphaSchedule(burn_in=200))])

The callback builds the :class:`Codistiller` of the LightningModule when fitting starts
(replica, number of replicas and exchange from ``codistill launch``'s environment), and
publishes and refreshes the teachers after optimizer steps (``trainer.global_step``: with
``accumulate_grad_batches``, one step per optimizer step). A teacher is a frozen copy of the
LightningModule, called as ``teacher(x)`` (its ``forward``) unless ``teachers=TeacherSpec(forward=...)``
says otherwise. Under a data-parallel strategy (``strategy="ddp"``) all the Trainer's processes are
one replica: its first rank publishes and loads, and hands the teachers to the others. The
teachers travel in Lightning's checkpoints, so ``fit(ckpt_path=...)`` resumes ψ as it was.
With N > 1 replicas each gets its own logger version (``version_0-replica-R``) and
checkpoint directory, so replicas launched with the same arguments overwrite nothing.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from .._extras import require
from ..codistiller import Codistiller
from ..losses import AlphaSchedule
from .common import per_replica, use_default_group

L = require("lightning.pytorch", "the PyTorch Lightning integration")

__all__ = ["CodistillCallback", "distill_loss"]

EMPTY_EVENT_FILE = 1024  # bytes: a TensorBoard event file holding its header alone


class CodistillCallback(L.Callback):
    """Owns one replica's :class:`Codistiller` in a Lightning ``Trainer``.

    Args:
        codistiller: a ready :class:`Codistiller` of the LightningModule; None: built in
            ``setup`` by :meth:`Codistiller.from_env` with ``exchange_every``, ``alpha``,
            ``burn_in`` and ``kwargs`` (e.g. ``teachers=TeacherSpec(forward=...)``).
        exchange_every: K; alpha: α (a number, or an :class:`AlphaSchedule`); burn_in: steps
            before ψ starts (with a number α). Named, so that ``LightningCLI`` can set them:
            ``--trainer.callbacks+=codistill.integrations.lightning.CodistillCallback
            --trainer.callbacks.exchange_every=50 --trainer.callbacks.burn_in=200``.

    The Codistiller is flushed when training ends (a further ``fit`` goes on with it).
    """

    def __init__(self, codistiller: Codistiller | None = None, exchange_every: int = 50,
                 alpha: float | AlphaSchedule = 1.0, burn_in: int = 0, **kwargs: Any) -> None:
        self.codistiller = codistiller
        schedule = alpha if isinstance(alpha, AlphaSchedule) else AlphaSchedule(alpha, burn_in)
        self.kwargs = {"exchange_every": exchange_every, "alpha": schedule, **kwargs}
        self._trainer: Any = None
        self._done: int | None = None  # the global step after_step last saw

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        if self.codistiller is None:
            self.codistiller = Codistiller.from_env(pl_module, **self.kwargs)
        use_default_group(self.codistiller)  # the strategy's processes are one replica
        if self.codistiller.num_replicas > 1:
            _separate_outputs(trainer, self.codistiller.replica)

    def distill_loss(self, inputs: Any, outputs: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
        """α·ψ at the Trainer's step (:meth:`Codistiller.distill_loss`; see :func:`distill_loss`)."""
        if self.codistiller is None or self._trainer is None:
            raise RuntimeError("CodistillCallback.distill_loss is for training_step (the callback is "
                               "set up when fit starts)")
        return self.codistiller.distill_loss(inputs, outputs, self._trainer.global_step, mask)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._done = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._done:  # an optimizer step was taken
            self._done = trainer.global_step
            self.codistiller.after_step(trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.codistiller.flush()  # the last publish is written, prefetching stops

    def state_dict(self) -> dict[str, Any]:
        return {"codistiller": self.codistiller.state_dict()} if self.codistiller is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "codistiller" in state_dict and self.codistiller is not None:  # restored after setup
            self.codistiller.load_state_dict(state_dict["codistiller"])


def _separate_outputs(trainer: Any, replica: int) -> None:
    """Give this replica its own logger versions and checkpoint directories. Lightning made
    the loggers' directories before any callback's ``setup`` (the same ``version_N`` for
    every replica started at once): each logger is moved to ``version_N-replica-R``, and the
    empty directory left behind is removed. ModelCheckpoints set up after this callback, so
    one without a ``dirpath`` follows its logger; one with a ``dirpath`` gets ``dirpath/replica-R``."""
    for logger in trainer.loggers:
        if not hasattr(logger, "_version") or not hasattr(logger, "_experiment"):
            continue  # a logger without versions (e.g. an online service's run): left as it is
        version = logger._version
        if isinstance(version, str) and per_replica(version, replica) == version:
            continue
        old_dir, old = logger.log_dir, logger._experiment
        logger._version = f"{version if isinstance(version, str) else f'version_{version}'}-replica-{replica}"
        logger._experiment = None  # made again, lazily, in the new directory
        _close_and_remove(old, old_dir)
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None):
            callback.dirpath = per_replica(str(callback.dirpath), replica)


def _close_and_remove(experiment: Any, directory: str) -> None:
    """Close a logger's first experiment and remove what it alone wrote: the empty event files
    this process made (TensorBoard names them ``…tfevents.TIME.HOST.PID.N``), then the
    directory if nothing else is in it."""
    if experiment is None:
        return
    close = getattr(experiment, "close", None)
    if callable(close):
        close()
    mine = re.compile(rf"tfevents\.\d+\..*\.{os.getpid()}\.\d+$")
    try:
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if mine.search(name) and os.path.isfile(path) and os.path.getsize(path) <= EMPTY_EVENT_FILE:
                os.unlink(path)
        os.rmdir(directory)
    except OSError:
        pass  # not empty (another run's files stay) or already gone


def distill_loss(module: Any, inputs: Any, outputs: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
    """α·ψ to add to ``module``'s loss in its ``training_step`` (:meth:`Codistiller.distill_loss`
    at the Trainer's step): the distillation term of the
    :class:`CodistillCallback` of ``module``'s Trainer toward the teachers' predictions on
    ``inputs`` (what a teacher is called with), ``outputs`` being ``module``'s on them. ``mask``:
    the positions that count (e.g. ``[batch, tokens]``, false for padding); default all. Zero
    during burn-in, before teachers are loaded, and when training alone."""
    for callback in module.trainer.callbacks:
        if isinstance(callback, CodistillCallback):
            return callback.distill_loss(inputs, outputs, mask)
    raise RuntimeError("distill_loss: the Trainer has no CodistillCallback; pass "
                       "callbacks=[CodistillCallback(...)] to lightning.Trainer")
