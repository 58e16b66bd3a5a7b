"""Codistillation in the Hugging Face Trainer (``pip install 'codistill[hf]'``).

    from codistill.integrations.hf import CodistillTrainer

    trainer = CodistillTrainer(model=model, args=args, train_dataset=train,
                               codistiller={"exchange_every": 50,
                                            "alpha": AlphaSchedule(burn_in=200)})
    trainer.train()

Each training batch's loss gains α·ψ toward the teachers' predictions on the batch without its
labels; the teachers are published and refreshed after the Trainer's optimizer steps
(``state.global_step``: with gradient accumulation, one step per optimizer step). Replica,
number of replicas and exchange come from ``codistill launch``'s environment
(:meth:`Codistiller.from_env`); under the Trainer's own data parallelism (torchrun, accelerate
launch) all its processes are one replica. For token predictions ψ counts the positions the
task loss counts: labels ≠ -100, shifted by one for a causal LM. With N > 1 replicas each
writes into its own ``output_dir/replica-R`` (checkpoints, logs, saved models), unless the
path names its replica already.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._extras import require
from ..codistiller import Codistiller
from ..env import replica_env
from ..modules import prediction
from .common import per_replica, token_mask, use_default_group

transformers = require("transformers", "the Hugging Face Trainer integration")

__all__ = ["CodistillCallback", "CodistillTrainer"]


class CodistillCallback(transformers.TrainerCallback):
    """Publishes and refreshes ``codistiller``'s teachers after each optimizer step, and
    flushes it when training ends (the last publish written, prefetching stopped). Every
    process calls it (the Trainer does)."""

    def __init__(self, codistiller: Codistiller) -> None:
        self.codistiller = codistiller

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.codistiller.after_step(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.codistiller.flush()


class CodistillTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training loss is φ + α·ψ.

    Args:
        codistiller: a :class:`Codistiller` of ``model``, or the keyword arguments of
            :meth:`Codistiller.from_env` (e.g. ``{"exchange_every": 50, "alpha":
            AlphaSchedule(burn_in=200)}``), built after the Trainer has set up its processes.
            None: ``from_env``'s defaults.
        shift_labels: whether position t predicts label t+1 (a causal LM) when masking ψ with
            the labels; None: true for the models ``AutoModelForCausalLM`` builds.
        args, kwargs: the Trainer's.

    Logs ``distill_loss`` (ψ without α, as in the engine's train rows; this process's mean
    since the last log) beside ``loss``.
    The Codistiller is flushed when training ends (a further ``train()`` goes on with it).
    """

    def __init__(self, *args: Any, codistiller: Codistiller | Mapping[str, Any] | None = None,
                 shift_labels: bool | None = None, **kwargs: Any) -> None:
        replica, num_replicas = ((codistiller.replica, codistiller.num_replicas)
                                 if isinstance(codistiller, Codistiller) else replica_env())
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if num_replicas > 1 and training_args is not None and training_args.output_dir:
            training_args.output_dir = per_replica(training_args.output_dir, replica)
        super().__init__(*args, **kwargs)
        if self.model is None:
            raise ValueError("CodistillTrainer needs model= (model_init is not supported)")
        if not isinstance(codistiller, Codistiller):
            codistiller = Codistiller.from_env(self.model, **dict(codistiller or {}))
        self.codistiller = use_default_group(codistiller)
        self.shift_labels = _is_causal_lm(self.model) if shift_labels is None else shift_labels
        self.add_callback(CodistillCallback(self.codistiller))
        self._psi_sum: torch.Tensor | float = 0.0
        self._psi_count = 0

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        kw = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        if not model.training:  # evaluation: the task loss alone
            return super().compute_loss(model, inputs, return_outputs, **kw)
        labels = {"labels", "shift_labels", *(self.label_names or [])}
        teacher_inputs = {k: v for k, v in inputs.items() if k not in labels}
        mask = self.distill_mask(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kw)
        step = self.state.global_step
        term = self.codistiller.distill_loss(teacher_inputs, outputs, step,
                                             mask if _fits(mask, outputs) else None)  # α·ψ
        alpha = self.codistiller.alpha(step)
        self._psi_sum = self._psi_sum + (term.detach() / alpha if alpha > 0 else term.detach())
        self._psi_count += 1
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            term = term / getattr(self, "current_gradient_accumulation_steps",
                                  self.args.gradient_accumulation_steps)
        loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def distill_mask(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """The positions ψ counts, from integer token labels (``shift_labels`` or ``labels``),
        else the ``attention_mask``; None for other labels (e.g. one class per sequence)."""
        if torch.is_tensor(inputs.get("shift_labels")):
            return token_mask(inputs["shift_labels"], shift=False)
        labels = inputs.get("labels")
        if torch.is_tensor(labels) and labels.dim() >= 2 and not labels.is_floating_point():
            return token_mask(labels, shift=self.shift_labels)
        attention = inputs.get("attention_mask")
        return attention.bool() if torch.is_tensor(attention) else None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._psi_count and "loss" in logs:
            logs["distill_loss"] = float(self._psi_sum) / self._psi_count
            self._psi_sum, self._psi_count = 0.0, 0
        super().log(logs, *args, **kwargs)

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer takes the loss as already divided over the accumulated batch
        (then ψ, a per-batch mean, is divided here), as ``Trainer.training_step`` decides."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        return bool(scaled)


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) \
        and not getattr(config, "is_encoder_decoder", False)


def _fits(mask: torch.Tensor | None, outputs: Any) -> bool:
    """A mask applies to token predictions of its shape (not to one prediction per sequence)."""
    return mask is not None and tuple(prediction(outputs).shape[:-1]) == tuple(mask.shape)
