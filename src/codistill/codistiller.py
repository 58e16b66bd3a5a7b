"""The plug-in: add codistillation to an existing PyTorch training loop in a few lines.

    cd = Codistiller(model, exchange="file:///shared/run1", replica=r, num_replicas=N,
                     exchange_every=50, burn_in=1000, distill="kl")
    for step, (x, y) in enumerate(batches):
        logits = model(x)
        loss = task_loss(logits, y) + cd.distill_loss(x, logits, step)  # 0 during burn-in
        loss.backward(); opt.step(); opt.zero_grad()
        cd.after_step(step + 1)      # publish own weights / refresh teachers when due
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .exchange import Exchange, MemoryExchange, Published, cpu_state, make_exchange, state_nbytes, unwrap
from .exchange.collective import share_teachers
from .losses import AlphaSchedule, distill_loss
from .teachers import Teacher, average_predictions

log = logging.getLogger(__name__)

_SHARED_MEMORY = MemoryExchange()


class Codistiller:
    """Owns one replica's teachers, its publishing, and the distillation term ψ.

    Args:
        model: this replica's model (may be DDP-wrapped).
        exchange: an :class:`Exchange`, a directory or a URL, or ``"memory"``: one
            in-memory exchange shared by every Codistiller of this process.
        replica, num_replicas: this replica's index and N.
        exchange_every: K, steps between publishing and refreshing teachers.
        burn_in: B, α is 0 for steps < B.
        alpha, ramp: the distillation weight and an optional linear ramp after burn-in.
        distill: ``"kl"``, ``"ce"`` (soft-target cross entropy) or ``"bce"`` (binary outputs).
        temperature: softmax temperature for teachers and student in ψ.
        model_spec: ``{"name": ..., **settings}`` written into the manifest so that peers
            can build a teacher of this replica's architecture.
        teacher_factory: ``f(peer, meta) -> module`` builds an empty teacher for ``peer``
            (``meta``: the peer's manifest meta); the default builds from the peer's
            published ``model`` spec, or copies ``model`` if there is none.
        peers: which replicas to distil from (default: all others).
        process_group: under DDP, the replica's process group: its first rank then publishes
            and loads the teachers and broadcasts them, so every rank of the replica distils
            from identical teachers. Without it every rank acts on its own.
    """

    def __init__(
        self,
        model: nn.Module,
        exchange: Exchange | str = "memory",
        replica: int = 0,
        num_replicas: int = 2,
        exchange_every: int = 50,
        burn_in: int = 0,
        alpha: float = 1.0,
        ramp: int = 0,
        distill: str = "kl",
        temperature: float = 1.0,
        model_spec: dict[str, Any] | None = None,
        teacher_factory: Callable[[int, dict[str, Any]], nn.Module] | None = None,
        peers: list[int] | None = None,
        process_group: Any = None,
    ) -> None:
        if not 0 <= replica < num_replicas:
            raise ValueError(f"replica must be in [0, {num_replicas}), got {replica}")
        if exchange_every < 1:
            raise ValueError(f"exchange_every must be >= 1, got {exchange_every}")
        if distill not in ("kl", "ce", "bce"):
            raise ValueError(f"distill must be 'kl', 'ce' or 'bce', got {distill!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.exchange = _SHARED_MEMORY if exchange == "memory" else make_exchange(exchange)
        self.replica = replica
        self.num_replicas = num_replicas
        self.exchange_every = exchange_every
        self.schedule = AlphaSchedule(alpha, burn_in, ramp)
        self.distill = distill
        self.temperature = temperature
        self.model_spec = model_spec
        self.teacher_factory = teacher_factory or self._default_teacher_factory
        self.peers = [p for p in range(num_replicas) if p != replica] if peers is None else list(peers)
        bad = [p for p in self.peers if p == replica or not 0 <= p < num_replicas]
        if bad:
            raise ValueError(f"peers must be other replicas in [0, {num_replicas}), got {bad}")
        if alpha < 0 or burn_in < 0 or ramp < 0:
            raise ValueError(f"alpha, burn_in and ramp must be >= 0, got {alpha}, {burn_in}, {ramp}")
        self.teachers: dict[int, Teacher] = {}
        self.bytes_published = 0
        self.bytes_read = 0
        self.last_distill_loss: float | None = None
        self.process_group = process_group

    # -- schedule ---------------------------------------------------------------------
    def alpha(self, step: int) -> float:
        return self.schedule(step) if self.peers else 0.0

    def exchange_due(self, step: int) -> bool:
        """True at exchange steps from which distillation is on within the next K steps."""
        k = self.exchange_every
        return step > 0 and step % k == 0 and self.alpha(step + k - 1) > 0

    # -- the loss term ----------------------------------------------------------------
    def distill_loss(self, inputs: Any, student_logits: torch.Tensor, step: int) -> torch.Tensor:
        """α(step)·ψ(mean of the teachers' predictions on ``inputs``, ``student_logits``).

        Zero (a scalar that adds nothing) during burn-in or before any teacher is loaded.
        """
        a = self.alpha(step)
        if a == 0.0 or not any(t.version is not None for t in self.teachers.values()):
            self.last_distill_loss = None
            return student_logits.new_zeros(())
        target = average_predictions(
            list(self.teachers.values()), inputs, self.distill, self.temperature
        )
        loss = distill_loss(student_logits, target.to(student_logits.dtype), self.distill,
                            self.temperature)
        self.last_distill_loss = float(loss.detach())
        return a * loss

    # -- exchange ---------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """Call once ``step`` optimizer steps are done: publish and refresh when due."""
        if self.exchange_due(step):
            self.exchange_now(step)

    def exchange_now(
        self, step: int, wait_for: Callable[[int], dict[int, int]] | None = None
    ) -> None:
        """Publish this replica's version ``step`` and refresh the teachers.

        ``wait_for(step)`` (run after publishing) returns the exact ``{peer: version}`` to
        load, which must then load. Under a process group the group's first rank does all
        this and broadcasts the teachers it loaded, so every rank holds identical teachers.
        """
        group = self._group()
        leader = group is None or group[0]
        changed: dict[int, Published] | None = None
        if leader:
            self.publish(step)
            before = self.teacher_versions()
            versions = wait_for(step) if wait_for is not None else None
            self.refresh_teachers(versions, strict=versions is not None)
            changed = {p: self.teachers[p].published() for p, v in self.teacher_versions().items()
                       if v is not None and v != before[p]}
        if group is None:
            return
        device = str(next(iter(self.model.parameters()), torch.empty(0)).device)
        for published in share_teachers(changed, leader, group[1], self.process_group, device).values():
            if not leader:
                self.load_teacher(published)

    def _group(self) -> tuple[bool, int] | None:
        """``(this rank leads the replica, the leader's global rank)`` under a process group."""
        if self.process_group is None or not dist.is_initialized():
            return None
        if dist.get_world_size(self.process_group) == 1:
            return None
        return dist.get_rank(self.process_group) == 0, dist.get_global_rank(self.process_group, 0)

    def publish_if_due(self, step: int) -> bool:
        if self.exchange_due(step):
            self.publish(step)
            return True
        return False

    def refresh_if_due(self, step: int) -> bool:
        if self.exchange_due(step):
            self.refresh_teachers()
            return True
        return False

    def publish(self, step: int) -> int:
        """Publish this replica's current weights as its version at ``step``."""
        meta = {"replica": self.replica, "model": self.model_spec}
        state = cpu_state(self.model)
        self.exchange.publish(self.replica, step, state, meta)
        n = state_nbytes(state)  # tensor bytes, the same unit as bytes_read
        self.bytes_published += n
        return n

    def refresh_teachers(
        self, versions: dict[int, int] | None = None, strict: bool = False
    ) -> dict[int, int | None]:
        """Load each peer's newest valid version (or the given ``{peer: step}``) if new.

        Returns ``{peer: loaded step}``; a peer with nothing valid published, or whose
        version does not fit its teacher, keeps its previous weights (or stays absent from
        the average). With ``strict``, a requested version that cannot be loaded raises.
        """
        for peer in self.peers:
            teacher = self.teachers.get(peer)
            want = None if versions is None else versions.get(peer)
            if want is None:
                steps = self.exchange.versions(peer)
                if not steps or (teacher is not None and teacher.version == steps[-1]):
                    continue
                published = self.exchange.latest(peer)
            elif teacher is not None and teacher.version == want:
                continue
            else:
                published = self.exchange.load(peer, want)
                if published is None and strict:
                    raise RuntimeError(f"replica {self.replica}: version {want} of peer {peer} is "
                                       "missing or invalid in the exchange")
            if published is not None:
                try:
                    self.load_teacher(published)
                except ValueError as e:  # a peer's bad version must not stop this replica
                    if strict:
                        raise
                    log.warning("replica %d: skipping peer %d step %d: %s", self.replica, peer,
                                published.step, e)
        return self.teacher_versions()

    def load_teacher(self, published: Published) -> None:
        """Load a peer's published weights into its teacher (built on first use)."""
        teacher = self.teachers.get(published.replica)
        if teacher is not None and teacher.version == published.step:
            return
        if teacher is None:
            try:
                with torch.random.fork_rng(devices=[]):  # building a teacher draws no training RNG
                    module = self.teacher_factory(published.replica, published.meta)
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"cannot build a teacher from its manifest: {e}") from e
            teacher = Teacher(published.replica, module)
            self.teachers[published.replica] = teacher
        teacher.load(published)
        self.bytes_read += state_nbytes(published.state)
        log.debug("replica %d loaded peer %d at step %d", self.replica, published.replica,
                  published.step)

    def teacher_versions(self) -> dict[int, int | None]:
        """``{peer: step of the loaded weights}`` (None where nothing is loaded yet)."""
        return {p: (t.version if (t := self.teachers.get(p)) else None) for p in self.peers}

    def staleness(self, step: int) -> dict[int, int | None]:
        """``{peer: steps since its loaded weights were published}``."""
        return {p: (t.staleness(step) if (t := self.teachers.get(p)) else None) for p in self.peers}

    def _default_teacher_factory(self, peer: int, meta: dict[str, Any]) -> nn.Module:
        spec = meta.get("model")
        if spec:
            if not isinstance(spec, dict):
                raise ValueError(f"model spec must be a mapping, got {spec!r}")
            from .models import build_model

            module = build_model(spec)
        else:
            module = copy.deepcopy(unwrap(self.model))
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        return module.to(device)
