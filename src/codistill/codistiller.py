"""The plug-in: add codistillation to an existing PyTorch training loop in a few lines.

    torch.manual_seed(replica_seed(0))   # each replica its own init
    cd = Codistiller.from_env(model, exchange_every=50, alpha=AlphaSchedule(burn_in=1000))
    for x, y in batches:
        out = model(x)
        loss = task_loss(out, y) + cd.distill_loss(x, out)  # 0 during burn-in
        loss.backward(); opt.step(); opt.zero_grad()
        cd.after_step()              # count the step; publish / refresh teachers when due
    cd.close()

or with everything explicit: ``Codistiller(model, exchange="/shared/run1", replica=r,
num_replicas=N, ...)``, ``cd.distill_loss(x, out, step)`` and ``cd.after_step(step + 1)``.

A facade over parts with one job each: the :class:`TeacherSet` (build, check, load, average
the teachers), the :class:`VersionPicker` (which versions a refresh loads: :class:`Newest`,
:class:`LockStep`, :class:`BoundedDrift`), the :class:`Publisher` and the :class:`ReplicaGroup`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .env import ENV_EXCHANGE, ENV_NUM_REPLICAS, ENV_REPLICA
from .exchange import Exchange, MemoryExchange, Published, make_exchange, signing, state_nbytes
from .exchange.compression import check_publish_dtype
from .exchange.signing import Trust
from .fused import Losses, fused_linear_loss, fused_loss
from .losses import AlphaSchedule, DistillLoss, distill_loss, predict_probs, task_loss
from .modules import unwrap
from .picking import BoundedDrift, LockStep, Newest, Policy, VersionPicker
from .publishing import Publisher
from .replica_group import ReplicaGroup
from .teachers import TeacherSet, TeacherSpec

__all__ = ["BoundedDrift", "Codistiller", "CodistillStats", "DistillLoss", "LockStep", "Newest",
           "TeacherSpec", "Trust"]


@dataclass(frozen=True)
class CodistillStats:
    """A Codistiller's counters (:meth:`Codistiller.stats`)."""

    bytes_published: int  # stored tensor bytes of this replica's versions written
    bytes_read: int  # stored tensor bytes of peers' versions loaded into teachers
    publish_failures: int  # writes that failed (a full disk, an unreachable store)
    publish_wait_s: float  # training time spent waiting for a previous write
    rejected_versions: int  # peers' versions rejected, and teachers dropped for non-finite predictions
    sync_wait_s: float  # time spent waiting for peers (lock-step, bounded drift)
    teacher_versions: dict[int, int | None]  # {peer: step of the loaded weights}
    staleness: dict[int, int | None]  # {peer: steps since its loaded weights were published}
    psi: float | None = None  # ψ (without α) of the last distill_loss; None before any teacher
    alpha: float = 0.0  # α of the last distill_loss

    def scalars(self) -> dict[str, float]:
        """The counters as flat ``{name: number}`` for any logger (teachers by peer)."""
        out = {"alpha": self.alpha, "bytes_published": self.bytes_published, "bytes_read": self.bytes_read,
               "publish_failures": self.publish_failures, "publish_wait_s": self.publish_wait_s,
               "rejected_versions": self.rejected_versions, "sync_wait_s": self.sync_wait_s}
        if self.psi is not None:
            out["psi"] = self.psi
        for peer, v in self.teacher_versions.items():
            if v is not None:
                out[f"teacher_version/{peer}"] = v
        for peer, s in self.staleness.items():
            if s is not None:
                out[f"staleness/{peer}"] = s
        return {k: float(v) for k, v in out.items()}


class Codistiller:
    """Owns one replica's teachers, its publishing, and the distillation term ψ.

    Args:
        model: this replica's model (may be DDP-wrapped, or sharded by FSDP2: then every rank
            calls :meth:`publish`, :meth:`refresh` and :meth:`after_step` together).
        exchange: an :class:`Exchange` (for replicas in one process, one ``MemoryExchange``
            passed to all of them), used as it is; or a directory or URL, for which
            :func:`make_exchange` builds a background writer (publishing off the training step:
            call :meth:`close` at the end).
        replica, num_replicas: this replica's index and N.
        exchange_every: K, steps between publishing and refreshing teachers.
        alpha: the distillation weight α, or its schedule (burn-in B, ramp):
            :class:`~codistill.losses.AlphaSchedule`.
        loss: ψ: ``"kl"``, ``"ce"`` or ``"bce"``, or a :class:`DistillLoss` (with its
            temperature and what the model's predictions are: logits, log_probs or probs).
        model_spec: ``{"name": ..., **settings}`` written into the manifest so that peers
            can build a teacher of this replica's architecture.
        teachers: how teachers are built and run, and of which peers (:class:`TeacherSpec`).
        wait: which peers' versions a refresh loads: :class:`Newest` (default),
            :class:`LockStep` or :class:`BoundedDrift`.
        process_group: under DDP or FSDP2, the replica's process group: its first rank then
            publishes and picks the teachers' versions and hands them to the other ranks, so
            every rank distils from identical teachers. Without it every rank acts on its own.
        trust: what is accepted from the exchange: signing key, run id, size bound (:class:`Trust`).
        writer: a TensorBoard ``SummaryWriter`` (anything with ``add_scalar``): at every
            exchange, :meth:`stats` is written to it under ``codistill/`` (ψ, α, teachers'
            versions and staleness, bytes, failures).
        publish_dtype: how this replica's versions store its weights: ``"fp32"`` (as the model
            holds them), ``"bf16"`` (half the bytes) or ``"int8"`` (per-channel quantised, about
            a quarter); peers decode any into their teachers' dtype; every check on a version
            and the byte counts apply to what it stores (:mod:`~codistill.exchange.compression`).
    """

    def __init__(
        self,
        model: nn.Module,
        exchange: Exchange | str,
        replica: int = 0,
        num_replicas: int = 2,
        exchange_every: int = 50,
        alpha: float | AlphaSchedule = 1.0,
        loss: str | DistillLoss = "kl",
        model_spec: dict[str, Any] | None = None,
        teachers: TeacherSpec | None = None,
        wait: Policy | None = None,
        process_group: Any = None,
        trust: Trust | None = None,
        writer: Any = None,
        publish_dtype: str = "fp32",
    ) -> None:
        if not 0 <= replica < num_replicas:
            raise ValueError(f"replica must be in [0, {num_replicas}), got {replica}")
        if exchange_every < 1:
            raise ValueError(f"exchange_every must be >= 1, got {exchange_every}")
        check_publish_dtype(publish_dtype)
        if exchange == "memory":
            raise ValueError("exchange='memory' cannot reach other Codistillers: create one "
                             "MemoryExchange() and pass it to every replica of this process")
        spec, trust = teachers or TeacherSpec(), trust or Trust()
        self.model, self.replica, self.num_replicas = model, replica, num_replicas
        self.exchange_every = exchange_every
        self.schedule = alpha if isinstance(alpha, AlphaSchedule) else AlphaSchedule(alpha)
        self.loss = loss if isinstance(loss, DistillLoss) else DistillLoss(loss)
        self.exchange = make_exchange(exchange, background=True)
        signing.configure(self.exchange, trust.key, trust.key_file, trust.run_id, exchange_every)
        max_bytes = trust.max_teacher_bytes
        if max_bytes is None:
            max_bytes = 4 * state_nbytes(unwrap(model).state_dict())
        if self.exchange.max_bytes is None or self.exchange.max_bytes < max_bytes:
            self.exchange.limit(max_bytes)  # shared in-process exchanges take the largest
        others = [p for p in range(num_replicas) if p != replica]
        self.peers = others if spec.peers is None else list(spec.peers)
        bad = [p for p in self.peers if p == replica or not 0 <= p < num_replicas]
        if bad:
            raise ValueError(f"peers must be other replicas in [0, {num_replicas}), got {bad}")
        self.group = ReplicaGroup(process_group)
        self.teachers = TeacherSet(model, spec, self.loss, max_bytes)
        self.picker = VersionPicker(self.exchange, self.peers, wait or Newest(), exchange_every, replica,
                                    self.exchange_due)
        self.publisher = Publisher(model, self.exchange, replica, model_spec, self.group, publish_dtype)
        self.step = 0  # optimizer steps done, as after_step counts them
        self.last_exchange: int | None = None  # step of the last refresh
        self.writer = writer
        self._psi: torch.Tensor | None = None  # the last ψ, read only when stats() are asked for
        self._alpha = 0.0
        self._forward_checked = False

    @classmethod
    def from_env(cls, model: nn.Module, exchange: Exchange | str | None = None, **kwargs: Any) -> Codistiller:
        """The Codistiller of this process as its launcher describes it (``codistill launch``
        sets ``CODISTILL_REPLICA``, ``CODISTILL_NUM_REPLICAS``, ``CODISTILL_EXCHANGE``). Under
        torchrun with several ranks per replica, the default process group is the replica's.
        Without the variables: replica 0 of 1, which has no peers (ψ is 0), so the same script
        also trains alone. ``kwargs`` are the constructor's."""
        replica = int(os.environ.get(ENV_REPLICA, 0))
        num_replicas = int(os.environ.get(ENV_NUM_REPLICAS, 1))
        where = exchange if exchange is not None else os.environ.get(ENV_EXCHANGE)
        if where is None:
            if num_replicas > 1:
                raise ValueError(f"{ENV_NUM_REPLICAS}={num_replicas} but no exchange: set {ENV_EXCHANGE} "
                                 "or pass exchange=")
            where = MemoryExchange()
        if "process_group" not in kwargs and dist.is_initialized() and dist.get_world_size() > 1:
            kwargs["process_group"] = dist.group.WORLD
        return cls(model, where, replica=replica, num_replicas=num_replicas, **kwargs)

    @property
    def last_psi(self) -> torch.Tensor | None:
        """ψ (without α) of the last loss computed, a 0-d tensor on the device (read without a
        host synchronisation); None before any teacher or during burn-in."""
        return self._psi

    # -- schedule ---------------------------------------------------------------------
    def alpha(self, step: int) -> float:
        return self.schedule(step) if self.peers else 0.0

    def exchange_due(self, step: int) -> bool:
        """True at exchange steps from which distillation is on within the next K steps."""
        k = self.exchange_every
        return step > 0 and step % k == 0 and self.alpha(step + k - 1) > 0

    # -- the loss term ----------------------------------------------------------------
    def distill_loss(self, inputs: Any, student_outputs: Any, step: int | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """α(step)·ψ(mean of the teachers' predictions on ``inputs``, the student's): the term
        to add to the task loss (ψ alone is :func:`codistill.losses.distill_loss`). With a task
        loss that is a cross entropy, :meth:`total_loss` gives φ + α·ψ in one pass instead.

        ``student_outputs``: the model's output on ``inputs`` (a tensor, or a tuple / mapping /
        object holding the prediction, see :func:`prediction`); ``step``: the step being
        computed (default: the steps :meth:`after_step` has counted); ``mask``: shaped like
        the prediction without its last axis (e.g. ``[batch, tokens]``), ψ is the mean over
        the positions where it is true (padding does not count). Zero (a scalar that adds
        nothing) during burn-in, before any teacher is loaded, or with nothing unmasked.
        """
        logits = self.loss.logits(student_outputs)
        return self._loss(inputs, logits, None, step, mask)

    def total_loss(self, inputs: Any, student_outputs: Any, targets: torch.Tensor, step: int | None = None,
                   ignore_index: int | None = -100) -> torch.Tensor:
        """φ + α·ψ in one call: φ the standard task loss of the prediction toward ``targets``
        (cross entropy over the last axis for integer class targets, positions equal to
        ``ignore_index`` left out of φ and ψ; binary cross entropy for ``loss="bce"``), ψ as
        :meth:`distill_loss`. For classes, φ, ψ and their gradient come from one chunked pass
        over the student's and teachers' logits (:func:`codistill.fused.fused_loss`), at about
        the cost of φ alone. Finding out whether any target is ``ignore_index`` reads one
        number from the device; pass ``ignore_index=None`` when none is (no host synchronisation)."""
        logits = self.loss.logits(student_outputs)
        if self.loss.kind == "bce":
            return task_loss(logits, targets, "binary") + self._loss(inputs, logits, None, step, None)
        if tuple(targets.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"targets of shape {tuple(targets.shape)} do not fit predictions of shape "
                             f"{tuple(logits.shape)} (they should be {tuple(logits.shape[:-1])})")
        keep = None if ignore_index is None else targets != ignore_index
        if keep is not None and bool(keep.all()):
            keep = None
        return self._loss(inputs, logits, targets, step, keep)

    def linear_loss(self, inputs: Any, hidden: torch.Tensor, head: nn.Linear | torch.Tensor,
                    targets: torch.Tensor | None = None, step: int | None = None,
                    mask: torch.Tensor | None = None, phi_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """φ + α·ψ (α·ψ alone without ``targets``) of the prediction ``head(hidden)`` (``head``: the
        output layer, an ``nn.Linear`` or its weight), from the student's last ``hidden`` states
        and the teachers' (``TeacherSpec.hidden`` and ``head``), chunk by chunk: no [tokens,
        vocabulary] tensor exists in the forward or the backward pass
        (:func:`codistill.fused.fused_linear_loss`). For causal LMs with vocabularies of 100k+,
        whose logits would take gigabytes per teacher. ``mask`` as for :meth:`distill_loss`
        (targets at masked positions are ignored); ``phi_weight`` w gives w·φ + α·ψ (a
        framework's own normalisation of φ); KL or soft-target ψ only."""
        if self.loss.kind == "bce":
            raise ValueError("linear_loss computes a softmax over classes; loss='bce' has one logit "
                             "per output")
        step = self.step if step is None else step
        a = self._alpha = self.alpha(step)
        feats = self.teachers.features(inputs) if a != 0.0 else None
        if feats is None:
            self._psi = None
            if targets is None:
                return hidden.new_zeros(())
        out = fused_linear_loss(hidden, head, feats or [], targets, a, self.loss.kind, self.loss.temperature,
                                mask, phi_weight)
        if feats is not None:
            self._psi = out.psi
        return out.total

    def _loss(self, inputs: Any, logits: torch.Tensor, targets: torch.Tensor | None, step: int | None,
              mask: torch.Tensor | None) -> torch.Tensor:
        """φ (with ``targets``) + α·ψ over the positions of ``mask``: the fused pass, or for
        ``bce`` ψ toward the averaged click probability."""
        if self.loss.kind != "bce":
            return self.losses(inputs, logits, targets, step, mask).total
        self._check_inputs(inputs, logits, mask)
        step = self.step if step is None else step
        a = self._alpha = self.alpha(step)
        teacher_logits = self.teachers.logits(inputs, check=False) if a != 0.0 else None
        if mask is not None:
            keep = mask.to(device=logits.device, dtype=torch.bool)
            logits = logits[keep]
            teacher_logits = teacher_logits and [z[keep] for z in teacher_logits]
        psi = self._bce(logits, teacher_logits)
        if psi is not None and not bool(torch.isfinite(psi)):  # a teacher that overflows, or the student
            kept = self.teachers.drop_nonfinite()
            psi = self._bce(logits, kept and ([z[keep] for z in kept] if mask is not None else kept))
        self.teachers.release()
        if psi is None:
            self._psi = None
            return logits.new_zeros(())
        self._psi = psi.detach()
        return psi if a == 1.0 else a * psi

    def _bce(self, logits: torch.Tensor, teacher_logits: list[torch.Tensor] | None) -> torch.Tensor | None:
        """ψ toward the teachers' mean click probability (None without teachers or rows)."""
        if not teacher_logits or logits.shape[0] == 0:
            return None
        t = self.loss.temperature
        probs = predict_probs(teacher_logits[0].float(), "bce", t)
        for z in teacher_logits[1:]:
            probs.add_(predict_probs(z.float(), "bce", t))
        if len(teacher_logits) > 1:
            probs.div_(len(teacher_logits))
        return distill_loss(logits, probs.to(logits.dtype), "bce", t)

    def losses(self, inputs: Any, logits: torch.Tensor, targets: torch.Tensor | None = None,
               step: int | None = None, mask: torch.Tensor | None = None) -> Losses:
        """(φ + α·ψ, φ, ψ) of categorical ``logits`` from one pass of
        :func:`~codistill.fused.fused_loss` (φ = 0 without ``targets``; ψ = 0 before any teacher
        or during burn-in), the parts a training loop logs. Teachers' logits are tested for
        finiteness only when the loss is not finite; a teacher that overflows is then dropped
        and the loss computed without it."""
        self._check_inputs(inputs, logits, mask)
        step = self.step if step is None else step
        a = self._alpha = self.alpha(step)
        teacher_logits = self.teachers.logits(inputs, check=False) if a != 0.0 else None
        def fused(teacher_logits: list[torch.Tensor] | None) -> Losses | None:
            return None if teacher_logits is None else fused_loss(
                logits, teacher_logits, targets, a, self.loss.kind, self.loss.temperature, mask)

        out = fused(teacher_logits)
        if out is not None and not bool(torch.isfinite(out.total)):  # a teacher overflows, or the student
            out = fused(self.teachers.drop_nonfinite())
        self.teachers.release()
        self._psi = None if out is None else out.psi
        return out if out is not None else _task_only(logits, targets, mask)

    def _check_inputs(self, inputs: Any, logits: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is not None and tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit predictions of shape "
                             f"{tuple(logits.shape)} (it should be {tuple(logits.shape[:-1])})")
        if not self._forward_checked:
            self.check_teacher_forward(inputs, logits)

    def check_teacher_forward(self, inputs: Any, logits: torch.Tensor) -> None:
        """Call the teachers' forward (``TeacherSpec.forward``) once on the student's own model
        (eval mode, no gradients, the random state kept) and check that its prediction has
        the shape of ``logits``, the student's: a wrong forward is found at the first step,
        even alone, not at the first exchange. :meth:`distill_loss` does this at its first call."""
        self._forward_checked = True
        module, stateful = unwrap(self.model), self.teachers.spec.stateful
        was_training = module.training
        devices = [logits.device] if logits.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                module.eval()
                got = self.teachers.predict(module, inputs, None) if stateful else \
                    self.teachers.predict(module, inputs)
        except Exception as e:
            raise ValueError(f"TeacherSpec.forward (how a teacher is called) fails on the student's own "
                             f"model with the inputs given to distill_loss: {type(e).__name__}: {e}") from e
        finally:
            module.train(was_training)
        got = got[0] if stateful else got
        if tuple(got.shape) != tuple(logits.shape):
            raise ValueError(
                f"TeacherSpec.forward gives predictions of shape {tuple(got.shape)} on the student's own "
                f"model, but the student's outputs given to distill_loss have shape {tuple(logits.shape)}: "
                "a teacher must be called as the student is (e.g. a seq-first RNN needs its hidden state "
                "sized by x.size(1), not len(x))")

    def distill_target(self, inputs: Any, step: int) -> tuple[float, list[torch.Tensor]] | None:
        """(α(step), each loaded teacher's logits on ``inputs``), or None when α is 0 or no
        teacher is loaded (or every one is dropped): the parts of ψ for a caller that
        computes it itself (e.g. with :func:`codistill.fused.fused_loss`)."""
        a = self.alpha(step)
        logits = self.teachers.logits(inputs) if a != 0.0 else None
        return None if logits is None else (a, logits)

    # -- exchange ---------------------------------------------------------------------
    def after_step(self, step: int | None = None) -> None:
        """Call after each optimizer step: counts it (or takes ``step``, the number of steps
        done), then publishes and refreshes when due. Every rank of a replica calls it."""
        step = self.step + 1 if step is None else step
        if not isinstance(step, int):
            raise TypeError(f"after_step(step): step must be an int, got {type(step).__name__}")
        self.step = step
        if self.exchange_due(step):
            self.publish(step)
            self.refresh(step)
            if self.writer is not None:
                for name, value in self.stats(step).scalars().items():
                    self.writer.add_scalar(f"codistill/{name}", value, step)

    def flush(self) -> None:
        """Finish the write in flight and stop reading ahead (until the next refresh): the
        end of one training run, after which the Codistiller can train again."""
        self.picker.stop()
        self.exchange.flush()

    def close(self) -> None:
        """:meth:`flush`, then release the exchange (the end of training)."""
        self.flush()
        self.exchange.close()

    def publish(self, step: int) -> int:
        """Publish this replica's current weights as its version at ``step``; return the
        tensor bytes (0 on a rank that is not its replica's first). A failed write is a
        warning counted in ``stats().publish_failures``: the next exchange publishes again."""
        return self.publisher.publish(step)

    def refresh(self, step: int | None = None) -> dict[int, int | None]:
        """Load the peers' versions into the teachers, as the ``wait`` policy picks them:
        each peer's newest valid version, or with :class:`LockStep` exactly its version
        ``step`` (waiting for it), or with :class:`BoundedDrift` the newest once no peer is
        too far behind ``step`` (``step`` None: the newest, without waiting). A version that
        fails its checks is rejected (counted in ``stats().rejected_versions``) and the
        peer's teacher keeps its weights. Under a process group the first rank picks and
        loads, then hands the new teachers to the replica's other ranks (whole, or each its
        shards of sharded teachers): every rank of the replica calls this together.
        Returns ``{peer: loaded step}`` (None for a peer with nothing loaded yet)."""
        if step is not None and not isinstance(step, int):
            raise TypeError(f"refresh(step): step must be an int or None, got {type(step).__name__}")
        group, teachers = self.group, self.teachers
        scatter = not group.solo and teachers.spec.layout is not None  # sharded teachers
        chosen: dict[int, Published] = {}  # sharded: picked by the first rank, loaded by all below
        if group.leads:
            before = self.teacher_versions()
            self.picker.pick(step, teachers, self._choose(chosen) if scatter else teachers.load)
            if not scatter:
                chosen = {p: teachers[p].published() for p, v in self.teacher_versions().items()
                          if v is not None and v != before[p]}
        if scatter:
            group.scatter(chosen if group.leads else None, teachers)
        elif not group.solo:
            device = next(iter(self.model.parameters()), torch.empty(0)).device
            group.share(chosen if group.leads else None, teachers, str(device))
        if group.leads:  # after the loads: their versions
            self.picker.watch(teachers)
        self.last_exchange = step
        return self.teacher_versions()

    def _choose(self, chosen: dict[int, Published]) -> Callable[[Published], None]:
        def choose(published: Published) -> None:  # checked and built now, loaded by every rank
            if self.teachers.accept(published) is not None:
                chosen[published.replica] = published

        return choose

    # -- read-only views --------------------------------------------------------------
    def stats(self, step: int | None = None) -> CodistillStats:
        """The counters: bytes and versions exchanged, failures, waits, and the teachers'
        versions and staleness at ``step`` (default: the steps :meth:`after_step` counted)."""
        return CodistillStats(
            bytes_published=self.publisher.bytes_published, bytes_read=self.teachers.bytes_read,
            publish_failures=self.publisher.failures, publish_wait_s=self.exchange.wait_seconds,
            rejected_versions=sum(self.exchange.rejected(p) for p in self.peers) + self.teachers.drops,
            sync_wait_s=self.picker.wait_s, teacher_versions=self.teacher_versions(),
            staleness=self.staleness(self.step if step is None else step),
            psi=None if self._psi is None else float(self._psi), alpha=self._alpha)

    def teacher_versions(self) -> dict[int, int | None]:
        """``{peer: step of the loaded weights}`` (None where nothing is loaded yet)."""
        return self.teachers.versions(self.peers)

    def staleness(self, step: int) -> dict[int, int | None]:
        """``{peer: steps since its loaded weights were published}``."""
        return self.teachers.staleness(self.peers, step)

    # -- state ------------------------------------------------------------------------
    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """The teachers (version, manifest meta and, with ``weights``, whole weights; sharded
        teachers are gathered: every rank calls this then) and counters, for a checkpoint."""
        return {"teachers": self.teachers.state(weights),
                "bytes_published": self.publisher.bytes_published, "bytes_read": self.teachers.bytes_read,
                "sync_wait_s": self.picker.wait_s, "last_exchange": self.last_exchange,
                "publish_failures": self.publisher.failures, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the same teachers, so ψ continues where it was. A
        state without weights builds the teachers and records their versions; the caller
        then loads their weights (as :class:`~codistill.checkpoint.Checkpointer` does)."""
        self.teachers.load_state(state["teachers"])
        self.publisher.bytes_published = state["bytes_published"]
        self.teachers.bytes_read = state["bytes_read"]
        self.picker.wait_s = state.get("sync_wait_s", 0.0)
        self.last_exchange = state.get("last_exchange")
        self.publisher.failures = state.get("publish_failures", 0)
        self.step = state.get("step", self.last_exchange or 0)


def _task_only(logits: torch.Tensor, targets: torch.Tensor | None, mask: torch.Tensor | None) -> Losses:
    """(φ, φ, 0) without teachers: cross entropy over the positions of ``mask`` (all zero without targets)."""
    if targets is None:
        zero = logits.new_zeros(())
        return Losses(zero, zero, zero)
    y = targets if mask is None else targets.where(mask, -100)
    phi = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    return Losses(phi, phi.detach(), phi.new_zeros(()))
