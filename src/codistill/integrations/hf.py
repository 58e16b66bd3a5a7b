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

For a causal LM whose logits are its output layer applied to its last hidden states (checked
on the first batch), φ + α·ψ are computed from the hidden states chunk by chunk
(:meth:`Codistiller.linear_loss`): no [tokens, vocabulary] logits exist for the student or the
teachers, which for vocabularies of 128k+ saves gigabytes per batch. Under a wrapper (DDP,
FSDP) or with label smoothing or a ``compute_loss_func`` the Trainer's own loss is used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._extras import require
from ..codistiller import Codistiller
from ..env import replica_env
from ..modules import prediction
from .common import IGNORE_INDEX, per_replica, token_mask, use_default_group

transformers = require("transformers", "the Hugging Face Trainer integration")

__all__ = ["CodistillCallback", "CodistillTrainer"]

log = logging.getLogger(__name__)


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
        fused_linear: compute a causal LM's φ + α·ψ from hidden states without logits (see the
            module's notes); None: when the model allows it, False: never.
        args, kwargs: the Trainer's.

    Logs ``distill_loss`` (ψ without α, as in the engine's train rows; this process's mean
    since the last log) beside ``loss``.
    The Codistiller is flushed when training ends (a further ``train()`` goes on with it).
    """

    def __init__(self, *args: Any, codistiller: Codistiller | Mapping[str, Any] | None = None,
                 shift_labels: bool | None = None, fused_linear: bool | None = None, **kwargs: Any) -> None:
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
        self.fused_linear = fused_linear  # None until the first batch decides
        self._psi_sum: torch.Tensor | float = 0.0
        self._psi_count = 0

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        kw = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        if not model.training:  # evaluation: the task loss alone
            return super().compute_loss(model, inputs, return_outputs, **kw)
        labels = {"labels", "shift_labels", *(self.label_names or [])}
        teacher_inputs = {k: v for k, v in inputs.items() if k not in labels}
        if not return_outputs and self._use_fused_linear(model, inputs, teacher_inputs):
            return self._linear_loss(model, inputs, teacher_inputs, num_items_in_batch)
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

    def _use_fused_linear(self, model: nn.Module, inputs: Mapping[str, Any],
                          teacher_inputs: dict[str, Any]) -> bool:
        """Whether this batch's loss comes from hidden states: decided once, on the first batch,
        by comparing the model's logits with its output layer applied to its last hidden states."""
        if self.fused_linear is False or model is not self.model or self.label_smoother is not None \
                or getattr(self, "compute_loss_func", None) is not None or not self.shift_labels \
                or not torch.is_tensor(inputs.get("labels")) or self.codistiller.loss.kind == "bce":
            return False
        if self.fused_linear is None:
            self.fused_linear = _logits_are_linear(model, teacher_inputs)
            if not self.fused_linear:
                log.info("%s: its logits are not its output layer on its last hidden states; "
                         "φ and ψ come from the logits", type(model).__name__)
                return False
            spec = self.codistiller.teachers.spec
            if spec.hidden is None or spec.head is None:
                self.codistiller.teachers.spec = dataclasses.replace(spec, hidden=last_hidden_states,
                                                                     head=output_layer)
        return True

    def _linear_loss(self, model: nn.Module, inputs: Mapping[str, Any], teacher_inputs: dict[str, Any],
                     num_items_in_batch: Any) -> torch.Tensor:
        """φ as the Trainer normalises it (a sum over ``num_items_in_batch`` tokens, scaled for
        the processes averaging tokens) + α·ψ, both from the last hidden states."""
        labels = inputs.get("shift_labels")
        if not torch.is_tensor(labels):
            labels = torch.full_like(inputs["labels"], IGNORE_INDEX)
            labels[..., :-1] = inputs["labels"][..., 1:]
        mask = labels != IGNORE_INDEX
        hidden = last_hidden_states(model, teacher_inputs)
        scale = 1.0
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            wide = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            scale = mask.sum().to(wide) / num_items_in_batch  # a sum over the accumulated batch's tokens
            if self.args.average_tokens_across_devices:
                scale = scale * (self.accelerator.num_processes // self.get_tp_size())
        steps = 1
        if self._loss_scaled_for_accumulation(num_items_in_batch):  # ψ is one micro-batch's mean
            steps = getattr(self, "current_gradient_accumulation_steps",
                            self.args.gradient_accumulation_steps)
        step = self.state.global_step
        loss = self.codistiller.linear_loss(teacher_inputs, hidden, output_layer(model), labels, step, mask,
                                            phi_weight=scale * steps)
        psi = self.codistiller.last_psi
        if psi is not None:
            self._psi_sum = self._psi_sum + psi
        self._psi_count += 1
        return loss / steps if steps != 1 else loss

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


def last_hidden_states(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """A Hugging Face model's last hidden states (after its final norm): its base model's first output."""
    return model.base_model(**inputs)[0]


def output_layer(model: nn.Module) -> nn.Module:
    """A Hugging Face model's output layer (``lm_head``)."""
    return model.get_output_embeddings()


def _logits_are_linear(model: nn.Module, inputs: Mapping[str, Any]) -> bool:
    """Whether ``model``'s logits on ``inputs`` are its ``nn.Linear`` output layer applied to its
    last hidden states (no soft-capping or scaling of logits): checked once, in eval mode,
    without gradients or random draws."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if not isinstance(head, nn.Linear) or model.base_model is model:
        return False
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            logits = prediction(model(**inputs)).float()
            direct = head(last_hidden_states(model, inputs)).float()
    except (TypeError, ValueError, RuntimeError, IndexError):
        return False
    finally:
        model.train(was_training)
    if direct.shape != logits.shape:
        return False
    return bool(torch.allclose(direct, logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max().clamp_min(1))))


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) \
        and not getattr(config, "is_encoder_decoder", False)


def _fits(mask: torch.Tensor | None, outputs: Any) -> bool:
    """A mask applies to token predictions of its shape (not to one prediction per sequence)."""
    return mask is not None and tuple(prediction(outputs).shape[:-1]) == tuple(mask.shape)
