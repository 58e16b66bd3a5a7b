"""Teachers: frozen, stale local copies of the peers, and their averaged predictions."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .exchange import Published
from .exchange.base import Header, header_of
from .losses import predict_probs
from .parallel import is_sharded, load_full_state

log = logging.getLogger(__name__)


def finite(t: torch.Tensor) -> bool:
    """True if every element of ``t`` is finite: one sum (a NaN or infinity makes it
    non-finite), and the exact test only when the sum is not finite (it may overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` on a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with every parameter excluded from autograd."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_run_teachers(run_dir: str, first: int) -> list[Published]:
    """The final weights of every replica of the finished run ``run_dir`` as published
    versions numbered ``first, first+1, ...`` (offline distillation's fixed teachers)."""
    import os

    import yaml

    from .rundir import load_weights

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"codistill.teachers_from: {run_dir} is not a run directory (no config.yaml)")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    out = []
    for r in range(int(cfg.get("replicas", 1))):
        state, spec = load_weights(run_dir, r)
        out.append(Published(first + r, int(cfg.get("steps", 0)), state, {"model": spec, "run": run_dir}))
    return out


class Teacher:
    """A frozen copy of one peer, loaded in place from that peer's published weights.

    ``module`` may be cast (``teacher_dtype``) or sharded across the replica's ranks;
    ``header`` then names the weights as the peer publishes them (default: ``module``'s)."""

    def __init__(self, peer: int, module: nn.Module, header: Header | None = None,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        self.peer = peer
        self.forward = forward or call_model  # module, inputs -> logits
        self.module = freeze(module)
        self.header = header if header is not None else header_of(module.state_dict())
        self.sharded = is_sharded(module)
        param = next(iter(module.parameters()), None)  # the forward's autocast: the teacher's own dtype
        self._device_type = param.device.type if param is not None else "cpu"
        self._bf16 = param is not None and param.dtype == torch.bfloat16
        self.version: int | None = None  # step at which the loaded weights were published
        self.meta: dict[str, Any] = {}  # the peer's manifest meta (its model spec)
        self.ident = ""  # the loaded version's ident (see Published.ident)
        self.dropped = False  # the loaded version predicted non-finite values: left out of ψ
        self.drops = 0  # versions dropped so far

    def load(self, published: Published, src: int | None = None, group: Any = None) -> None:
        """Copy ``published`` weights into the preallocated module (no rebuild), cast to its
        dtype. A sharded teacher: every rank of the replica calls this together, the weights
        given on global rank ``src`` of ``group`` (an empty state elsewhere)."""
        try:
            if self.sharded:
                load_full_state(self.module, published.state or None, src, group)
            else:
                self.module.load_state_dict(published.state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"published weights of replica {published.replica} at step {published.step} "
                f"do not fit its teacher module: {e}"
            ) from e
        freeze(self.module)
        self.dropped = False
        self.version = published.step
        self.meta = published.meta
        self.ident = published.ident

    def published(self) -> Published:
        """The loaded weights as a :class:`Published` version (to pass on to other ranks)."""
        if self.version is None:
            raise RuntimeError(f"teacher of replica {self.peer} has no weights loaded")
        return Published(self.peer, self.version, self.module.state_dict(), self.meta, ident=self.ident)

    def staleness(self, step: int) -> int | None:
        """Steps since the loaded weights were published (None before the first load); 0
        when the peer is ahead of ``step`` (its weights are newer than this replica's)."""
        return None if self.version is None else max(0, step - self.version)

    @torch.no_grad()
    def predict(self, inputs: Any, kind: str, temperature: float = 1.0) -> torch.Tensor:
        """The teacher's predicted probabilities (in fp32), its forward run in its own dtype
        (whatever autocast the student's step is under)."""
        with torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=self._bf16):
            out = self.forward(self.module, inputs)
        return predict_probs(out.float(), kind, temperature)


@torch.no_grad()
def average_predictions(
    teachers: list[Teacher], inputs: Any, kind: str, temperature: float = 1.0
) -> torch.Tensor | None:
    """mean_j p_j(x) over the loaded teachers; raises if none is loaded, None if every one
    is dropped. A teacher whose predictions on ``inputs`` are not finite (weights that are
    finite but overflow in its forward) is dropped, from this step until its peer's next
    version is loaded, with a warning naming the peer. The test is one reduction per
    teacher (:func:`finite`)."""
    loaded = [t for t in teachers if t.version is not None]
    if not loaded:
        raise RuntimeError("no teacher has weights loaded yet")
    total, n = None, 0
    for t in loaded:
        if t.dropped and not t.sharded:
            continue
        probs = t.predict(inputs, kind, temperature)  # a sharded forward is collective: every rank runs it
        if t.dropped:
            continue
        if not finite(probs):
            t.dropped, t.drops = True, t.drops + 1
            log.warning("the teacher of peer %d (its version of step %d) predicts non-finite values; "
                        "distilling without it until peer %d publishes a newer version", t.peer,
                        t.version, t.peer)
            continue
        total, n = (probs, 1) if total is None else (total.add_(probs), n + 1)
    return total.div_(n) if total is not None and n > 1 else total
