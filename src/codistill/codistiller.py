"""The plug-in: add codistillation to an existing PyTorch training loop in a few lines.

    cd = Codistiller.from_env(model, exchange_every=50, burn_in=1000)  # set by codistill launch
    for x, y in batches:
        out = model(x)
        loss = task_loss(out, y) + cd.distill_loss(x, out)  # 0 during burn-in
        loss.backward(); opt.step(); opt.zero_grad()
        cd.after_step()              # count the step; publish / refresh teachers when due
    cd.close()

or with everything explicit: ``Codistiller(model, exchange="/shared/run1", replica=r,
num_replicas=N, ...)``, ``cd.distill_loss(x, out, step)`` and ``cd.after_step(step + 1)``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .exchange import Exchange, Published, make_exchange, signing, state_nbytes, unwrap
from .exchange.base import CANDIDATES, Check, Header, HostBuffers, header_nbytes, header_of
from .exchange.collective import share_teachers
from .exchange.prefetch import Prefetcher
from .losses import DISTILL_KINDS, PREDICTIONS, AlphaSchedule, as_logits, distill_loss, prediction
from .parallel import full_state, is_sharded
from .teachers import Teacher, average_predictions, finite

log = logging.getLogger(__name__)

class Codistiller:
    """Owns one replica's teachers, its publishing, and the distillation term ψ.

    Args:
        model: this replica's model (may be DDP-wrapped).
        exchange: an :class:`Exchange` (for replicas in one process, one ``MemoryExchange``
            passed to all of them), or a directory or URL (then written by a background
            thread, off the training step: call :meth:`close` at the end).
        replica, num_replicas: this replica's index and N.
        exchange_every: K, steps between publishing and refreshing teachers.
        burn_in: B, α is 0 for steps < B.
        alpha, ramp: the distillation weight and an optional linear ramp after burn-in.
        distill: ``"kl"``, ``"ce"`` (soft-target cross entropy) or ``"bce"`` (binary outputs).
        temperature: softmax temperature for teachers and student in ψ.
        model_spec: ``{"name": ..., **settings}`` written into the manifest so that peers
            can build a teacher of this replica's architecture.
        teacher_factory: ``f(peer, meta) -> module`` builds an empty teacher for ``peer``
            (``meta``: the peer's manifest meta; the Codistiller moves it to the model's
            device); the default builds from the peer's published ``model`` spec, or copies
            ``model``.
        peers: which replicas to distil from (default: all others).
        process_group: under DDP, the replica's process group: its first rank then publishes
            and loads the teachers and broadcasts them, so every rank of the replica distils
            from identical teachers. Without it every rank acts on its own.
        sync_timeout: lock-step mode: a refresh at step S waits (at most this many seconds)
            for every peer's version S and loads exactly those. None: newest valid versions.
        max_teacher_bytes: a peer's weights larger than this are rejected before they are
            read (default: 4× this replica's own weights; the exchange is untrusted input).
        max_drift: asynchronous replicas: at an exchange, wait (at most ``drift_timeout``
            seconds) until every peer has published a version no more than this many steps
            behind this replica (0: never wait).
        teacher_dtype: store and run teachers in this dtype (e.g. ``torch.bfloat16``);
            published weights keep the model's dtype. None: as built.
        teacher_forward: ``f(module, inputs) -> output`` calls a teacher (default: ``module(x)``
            for a tensor, ``module(*x)`` for a tuple, ``module(**x)`` for a dict); e.g. a
            recurrent model that needs a fresh state: ``lambda m, x: m(x, m.init_hidden(len(x)))``.
            The prediction is then found in the output as :func:`prediction` does.
        outputs: what the model's prediction is: ``"logits"`` (default), ``"log_probs"``
            or ``"probs"``; teachers' and student's alike.
        prefetch: read peers' new versions in a background thread between exchanges, so a
            refresh only copies them into the teachers (default: on for exchanges that
            outlive the process, i.e. directories and URLs, unless ``sync_timeout`` is set).
        teacher_layout: ``f(module) -> module`` lays a new teacher out over the replica's
            ranks, e.g. :func:`codistill.parallel.shard_model` (FSDP2) so that each rank
            holds a shard of every teacher. A model sharded that way (``model``) is published
            by gathering one tensor at a time: then every rank calls :meth:`publish`,
            :meth:`refresh` and :meth:`after_step` together.
        exchange_key, exchange_key_file: the key shared by every replica (hex text, raw bytes or
            a list, the first signing; or a file holding it), default ``CODISTILL_EXCHANGE_KEY``:
            a directory or URL exchange then signs every version and rejects unsigned or
            wrongly signed ones before reading their weights (:mod:`codistill.exchange.signing`).
        run_id: written into every version; peers' versions of another run id are rejected
            (default ``CODISTILL_RUN_ID``; None: any run's versions are read).
    """

    def __init__(
        self,
        model: nn.Module,
        exchange: Exchange | str,
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
        sync_timeout: float | None = None,
        max_teacher_bytes: int | None = None,
        max_drift: int = 0,
        drift_timeout: float = 600.0,
        teacher_dtype: torch.dtype | None = None,
        teacher_layout: Callable[[nn.Module], nn.Module] | None = None,
        teacher_forward: Callable[[nn.Module, Any], Any] | None = None,
        outputs: str = "logits",
        prefetch: bool | None = None,
        exchange_key: str | bytes | list[str | bytes] | None = None,
        exchange_key_file: str | None = None,
        run_id: str | None = None,
    ) -> None:
        if not 0 <= replica < num_replicas:
            raise ValueError(f"replica must be in [0, {num_replicas}), got {replica}")
        if exchange_every < 1:
            raise ValueError(f"exchange_every must be >= 1, got {exchange_every}")
        if distill not in DISTILL_KINDS:
            raise ValueError(f"distill must be one of {list(DISTILL_KINDS)}, got {distill!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if outputs not in PREDICTIONS:
            raise ValueError(f"outputs must be one of {list(PREDICTIONS)}, got {outputs!r}")
        if max_drift < 0:
            raise ValueError(f"max_drift must be >= 0, got {max_drift}")
        if alpha < 0 or burn_in < 0 or ramp < 0:
            raise ValueError(f"alpha, burn_in and ramp must be >= 0, got {alpha}, {burn_in}, {ramp}")
        if exchange == "memory":
            raise ValueError("exchange='memory' cannot reach other Codistillers: create one "
                             "MemoryExchange() and pass it to every replica of this process")
        self.model = model
        self.exchange = make_exchange(exchange, background=True)  # a location: a background writer
        signing.configure(self.exchange, exchange_key, exchange_key_file, run_id, exchange_every)
        self.replica = replica
        self.num_replicas = num_replicas
        self.exchange_every = exchange_every
        self.schedule = AlphaSchedule(alpha, burn_in, ramp)
        self.distill = distill
        self.temperature = temperature
        self.model_spec = model_spec
        self.teacher_factory = teacher_factory or self._default_teacher_factory
        self._spec_teachers = teacher_factory is None  # teachers built from a manifest's (untrusted) spec
        self.teacher_dtype, self.teacher_layout = teacher_dtype, teacher_layout
        self.teacher_forward, self.outputs = teacher_forward, outputs
        self.step = 0  # optimizer steps done, as after_step counts them
        if max_teacher_bytes is None:
            max_teacher_bytes = 4 * _model_nbytes(model)
        self.max_teacher_bytes = max_teacher_bytes
        if self.exchange.max_bytes is None or self.exchange.max_bytes < max_teacher_bytes:
            self.exchange.limit(max_teacher_bytes)  # shared in-process exchanges take the largest
        self.peers = [p for p in range(num_replicas) if p != replica] if peers is None else list(peers)
        bad = [p for p in self.peers if p == replica or not 0 <= p < num_replicas]
        if bad:
            raise ValueError(f"peers must be other replicas in [0, {num_replicas}), got {bad}")
        self.process_group = process_group
        self.sync_timeout = sync_timeout
        self.max_drift, self.drift_timeout = max_drift, drift_timeout
        self.teachers: dict[int, Teacher] = {}
        self.bytes_published = 0
        self.bytes_read = 0
        self.sync_wait_s = 0.0  # time spent waiting for peers in lock-step mode
        self._publish_failures = -self.exchange.failures(replica)  # counted from here on
        self._pending: dict[int, Published] | None = None  # sharded teachers: chosen, loaded together
        self._host = HostBuffers()  # reused host copies of the weights for a publish in flight
        if prefetch is None:
            prefetch = self.exchange.durable and sync_timeout is None
        self._prefetcher = Prefetcher(self.exchange) if prefetch else None
        self.last_exchange: int | None = None  # step of the last refresh

    @classmethod
    def from_env(cls, model: nn.Module, exchange: Exchange | str | None = None, **kwargs: Any) -> Codistiller:
        """The Codistiller of this process as its launcher describes it (``codistill launch``
        sets ``CODISTILL_REPLICA``, ``CODISTILL_NUM_REPLICAS``, ``CODISTILL_EXCHANGE``). Under
        torchrun with several ranks per replica, the default process group is the replica's.
        Without the variables: replica 0 of 1, which has no peers (ψ is 0), so the same script
        also trains alone. ``kwargs`` are the constructor's."""
        import os

        from .env import ENV_EXCHANGE, ENV_NUM_REPLICAS, ENV_REPLICA
        from .exchange import MemoryExchange

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
        """α(step)·ψ(mean of the teachers' predictions on ``inputs``, the student's).

        ``student_outputs``: the model's output on ``inputs`` (a tensor, or a tuple / mapping /
        object holding the prediction, see :func:`prediction`); ``step``: the step being
        computed (default: the steps :meth:`after_step` has counted); ``mask``: shaped like
        the prediction without its last axis (e.g. ``[batch, tokens]``), ψ is the mean over
        the positions where it is true (padding does not count). Zero (a scalar that adds
        nothing) during burn-in, before any teacher is loaded, or with nothing unmasked.
        """
        logits = as_logits(prediction(student_outputs), self.outputs, self.distill)
        if mask is not None and tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit predictions of shape "
                             f"{tuple(logits.shape)} (it should be {tuple(logits.shape[:-1])})")
        target = self.distill_target(inputs, self.step if step is None else step)
        if target is None:
            return logits.new_zeros(())
        a, probs = target
        if mask is not None:
            keep = mask.to(device=logits.device, dtype=torch.bool)
            logits, probs = logits[keep], probs[keep]
            if logits.shape[0] == 0:
                return logits.new_zeros(())
        psi = distill_loss(logits, probs.to(logits.dtype), self.distill, self.temperature)
        return psi if a == 1.0 else a * psi

    def distill_target(self, inputs: Any, step: int) -> tuple[float, torch.Tensor] | None:
        """(α(step), the teachers' averaged predictions on ``inputs``), or None when α is 0
        or no teacher is loaded (or every one is dropped): the parts of ψ for a caller that
        computes it itself (e.g. fused with φ, :func:`codistill.losses.task_and_distill_loss`)."""
        a = self.alpha(step)
        if a == 0.0 or not any(t.version is not None for t in self.teachers.values()):
            return None
        probs = average_predictions(list(self.teachers.values()), inputs, self.distill, self.temperature)
        return None if probs is None else (a, probs)

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

    def flush(self) -> None:
        """Finish the write in flight and stop reading ahead (until the next refresh): the
        end of one training run, after which the Codistiller can train again."""
        if self._prefetcher is not None:
            self._prefetcher.stop()
        self.exchange.flush()

    def close(self) -> None:
        """:meth:`flush`, then release the exchange (the end of training)."""
        self.flush()
        self.exchange.close()

    def publish(self, step: int) -> int:
        """Publish this replica's current weights as its version at ``step``; return the
        tensor bytes (0 on a rank that is not its replica's first). A failed write is a
        warning counted in :attr:`publish_failures`: the next exchange publishes again."""
        if not self._leads() and not is_sharded(self.model):
            return 0
        if self.exchange.holds_state:  # a background writer: a copy, in buffers its last write freed
            self.exchange.flush()
            state = full_state(self.model, self._leads(), host=self._host)
        else:  # the exchange reads the weights before it returns
            state = full_state(self.model, self._leads(), copy=False)
        if state is None:  # a sharded model is gathered by every rank; the first one publishes
            return 0
        meta = {"replica": self.replica, "model": self.model_spec}
        signing.note_published(self.exchange, step)  # before a background write lands
        try:
            self.exchange.publish(self.replica, step, state, meta)
        except OSError as e:  # a full disk or an unreachable store must not end the run
            self.exchange.failed(self.replica, step, e)
            return 0
        n = state_nbytes(state)  # tensor bytes, the same unit as bytes_read
        self.bytes_published += n
        return n

    def refresh(self, step: int | None = None) -> dict[int, int | None]:
        if step is not None and not isinstance(step, int):
            raise TypeError(f"refresh(step): step must be an int or None, got {type(step).__name__}")
        """Load each peer's newest valid version into its teacher (with ``sync_timeout``:
        exactly its version ``step``, waiting for it). Under a process group the first rank
        chooses and loads, then hands the new teachers to the replica's other ranks.
        Returns ``{peer: loaded step}``; a peer with nothing valid keeps its old weights."""
        group = self._group()
        changed: dict[int, Published] | None = None
        scatter = group is not None and self.teacher_layout is not None  # sharded teachers
        if scatter and group[0]:
            self._pending = {}  # the first rank chooses; every rank loads its shards below
        if group is None or group[0]:
            if self._prefetcher is not None:
                self._prefetcher.stop()
            before = self.teacher_versions()
            if self.sync_timeout is not None and step is not None:
                self._load_exact(self._wait_for_peers(step))
            else:
                if self.max_drift and step is not None:
                    self._wait_for_drift(step)
                self._load_newest()
            changed = {p: self.teachers[p].published() for p, v in self.teacher_versions().items()
                       if v is not None and v != before[p]} if not scatter else self._pending
            self._pending = None
        if scatter:
            self._load_sharded(changed, group)
        elif group is not None:
            for published in share_teachers(changed, group[0], group[1], self.process_group,
                                            str(self._device())).values():
                if not group[0]:
                    self._load(published)
        if self._prefetcher is not None and (group is None or group[0]):  # after the loads: their versions
            self._prefetcher.start(self.teacher_versions(), self._check)
        self.last_exchange = step
        return self.teacher_versions()

    def _load_newest(self) -> None:
        """Load each peer's newest valid version, trying at most ``CANDIDATES`` of its
        versions per refresh (rejected ones are remembered and not tried again)."""
        for peer in self.peers:
            teacher = self.teachers.get(peer)
            try:
                steps = self.exchange.candidates(peer)
            except OSError as e:  # an unreachable store: the teachers stay as they are
                log.warning("replica %d: cannot list the versions of peer %d (%s)", self.replica, peer, e)
                continue
            for tried, step in enumerate(steps):
                if teacher is not None and teacher.version == step and \
                        self.exchange.ident(peer, step) in (None, teacher.ident):
                    break  # newer versions were invalid: keep this one (unless published again)
                if tried == CANDIDATES:
                    break
                published = self._prefetcher.take(peer, step, self.exchange.ident(peer, step)) \
                    if self._prefetcher is not None else None
                if published is None:
                    published = self.exchange.load(peer, step, self._check(peer))
                if published is None:
                    continue
                try:
                    self._load(published)
                    break
                except ValueError as e:  # a peer's bad version must not stop this replica
                    self.exchange.refuse(peer, step, f"peer {peer} step {step}", str(e),
                                         (peer, step, "loaded", published.ident))

    def _load_exact(self, versions: dict[int, int]) -> None:
        for peer, want in versions.items():
            teacher = self.teachers.get(peer)
            if teacher is not None and teacher.version == want:
                continue
            published = self.exchange.load(peer, want, self._check(peer))
            if published is None:
                raise RuntimeError(f"replica {self.replica}: version {want} of peer {peer} is "
                                   "missing or invalid in the exchange")
            self._load(published)

    def _check(self, peer: int) -> Check:
        """The test a peer's version must pass before its tensors are read: at most
        ``max_teacher_bytes``, and the names, dtypes and shapes of its teacher (for a teacher
        not built yet: of the module its manifest's spec describes, built without memory)."""

        def check(header: Header, meta: dict[str, Any]) -> None:
            nbytes = header_nbytes(header)
            if nbytes > self.max_teacher_bytes:
                raise ValueError(f"{nbytes} bytes of weights exceed max_teacher_bytes="
                                 f"{self.max_teacher_bytes}")
            teacher = self.teachers.get(peer)
            if teacher is not None:
                expected: Header | None = teacher.header
            elif self._spec_teachers:
                expected = self._skeleton_header(meta)
            else:
                expected = None  # the caller's factory decides; Teacher.load checks after reading
            if expected is not None and header != expected:
                missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
                wrong = sorted(k for k in set(header) & set(expected) if header[k] != expected[k])
                raise ValueError(f"weights do not fit the teacher (missing {missing[:3]}, unexpected "
                                 f"{extra[:3]}, other dtype/shape {wrong[:3]})")

        return check

    def _skeleton_header(self, meta: dict[str, Any]) -> Header:
        """Names, dtypes and shapes of the teacher the default factory would build from
        ``meta``, built on the meta device (allocates nothing, whatever the spec claims)."""
        spec = meta.get("model")
        if not spec:
            return header_of(unwrap(self.model).state_dict())
        try:
            with torch.device("meta"):
                module = self._build_from_spec(spec)
        except Exception as e:  # a hostile spec may fail anywhere in a model's constructor
            raise ValueError(f"cannot build a teacher from the manifest's model spec: {e}") from e
        return header_of(module.state_dict())

    def _wait_for_peers(self, step: int) -> dict[int, int]:
        """Lock-step mode: block until every peer has published its version ``step``."""
        self.exchange.flush()
        self._wait_until(lambda p: step in self.exchange.versions(p), self.sync_timeout,
                         lambda behind: f"codistill.sync: replicas {behind} did not publish step {step} "
                                        f"within {self.sync_timeout:g}s")
        return dict.fromkeys(self.peers, step)

    def _wait_for_drift(self, step: int) -> None:
        """Block until every peer has published a version at least the newest exchange step
        ``max_drift`` behind ``step``, so no replica runs further ahead of its slowest peer."""
        k = self.exchange_every
        target = (step - self.max_drift) // k * k
        if target <= 0 or not self.exchange_due(target):
            return
        self._wait_until(
            lambda p: max(self.exchange.versions(p), default=-1) >= target, self.drift_timeout,
            lambda behind: f"codistill.max_drift: replica {self.replica} is at step {step}, and replicas "
                           f"{behind} have not published step {target} within {self.drift_timeout:g}s (a "
                           f"replica may run at most max_drift={self.max_drift} steps ahead of its slowest "
                           "peer; is a peer down?)")

    def _wait_until(self, ready: Callable[[int], bool], timeout: float, message: Callable[[list[int]], str]
                    ) -> None:
        """Poll until ``ready(peer)`` holds for every peer; TimeoutError(``message(behind)``)
        after ``timeout`` seconds. The time waited counts in ``sync_wait_s``."""
        t0 = time.perf_counter()
        behind = list(self.peers)
        while behind := [p for p in behind if not ready(p)]:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(message(behind))
            time.sleep(0.02)
        self.sync_wait_s += time.perf_counter() - t0

    def _load(self, published: Published, count: bool = True) -> None:
        """Load a peer's published weights into its teacher (built on first use)."""
        teacher = self.teachers.get(published.replica)
        if teacher is not None and teacher.version == published.step and teacher.ident == published.ident:
            return
        bad = [k for k, v in published.state.items() if v.is_floating_point() and not finite(v)]
        if bad:  # a diverged peer: keep distilling from its last finite version
            raise ValueError(f"non-finite weights ({', '.join(bad[:3])})")
        teacher = self._teacher(published.replica, published.meta)
        if self._pending is not None:  # sharded teachers: loaded on every rank in _load_sharded
            self._pending[published.replica] = published
            return
        teacher.load(published)
        if count:
            self.bytes_read += state_nbytes(published.state)
        log.debug("replica %d loaded peer %d at step %d", self.replica, published.replica, published.step)

    def _teacher(self, peer: int, meta: dict[str, Any]) -> Teacher:
        """``peer``'s teacher, built on first use: the factory's module on this replica's
        device, cast to ``teacher_dtype`` and laid out by ``teacher_layout`` (e.g. sharded:
        each rank then keeps only its shards)."""
        teacher = self.teachers.get(peer)
        if teacher is not None:
            return teacher
        try:
            with torch.random.fork_rng(devices=[]):  # building a teacher draws no training RNG
                module = self.teacher_factory(peer, meta)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"cannot build a teacher from its manifest: {e}") from e
        header = header_of(module.state_dict())  # as the peer publishes it
        # Built whole, not on the meta device: buffers outside the state dict (a model's
        # constants) would otherwise be left uninitialised.
        module = module.to(self._device())
        if self.teacher_dtype is not None:
            module = module.to(self.teacher_dtype)
        if self.teacher_layout is not None:
            module = self.teacher_layout(module)
        teacher = self.teachers[peer] = Teacher(peer, module, header, self._predict)
        return teacher

    def _predict(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        """A teacher's prediction on ``inputs``, as logits."""
        from .teachers import call_model

        out = self.teacher_forward(module, inputs) if self.teacher_forward else call_model(module, inputs)
        return as_logits(prediction(out), self.outputs, self.distill)

    def _load_sharded(self, chosen: dict[int, Published] | None, group: tuple[bool, int]) -> None:
        """Every rank of the replica: load the versions the first rank ``chose`` into the
        sharded teachers, one tensor at a time (each rank keeps its shards)."""
        leads, src = group
        box: list[Any] = [{p: (v.step, v.meta, v.ident) for p, v in (chosen or {}).items()}]
        dist.broadcast_object_list(box, src=src, group=self.process_group)
        for peer, (step, meta, ident) in sorted(box[0].items()):
            published = (chosen or {}).get(peer) or Published(peer, step, {}, meta, ident=ident)
            self._teacher(peer, meta).load(published, src, self.process_group)
            if leads:
                self.bytes_read += state_nbytes(published.state)

    def _leads(self) -> bool:
        group = self._group()
        return group is None or group[0]

    def _group(self) -> tuple[bool, int] | None:
        """``(this rank leads the replica, the leader's global rank)`` under a process group."""
        if self.process_group is None or not dist.is_initialized():
            return None
        if dist.get_world_size(self.process_group) == 1:
            return None
        return dist.get_rank(self.process_group) == 0, dist.get_global_rank(self.process_group, 0)

    def _device(self) -> torch.device:
        return next(iter(self.model.parameters()), torch.empty(0)).device

    # -- read-only views --------------------------------------------------------------
    @property
    def bytes_published(self) -> int:
        """Tensor bytes of this replica's versions written to the exchange (a write that
        failed in the background writer is taken back once it has failed)."""
        return self._published - (self.exchange.unwritten(self.replica) - self._unwritten)

    @bytes_published.setter
    def bytes_published(self, n: int) -> None:
        self._published, self._unwritten = n, self.exchange.unwritten(self.replica)

    @property
    def rejected_versions(self) -> int:
        """Peers' versions rejected: unreadable or invalid entries in the exchange, versions
        that do not fit or hold non-finite weights, teachers dropped for non-finite predictions."""
        return sum(self.exchange.rejected(p) for p in self.peers) + \
            sum(t.drops for t in self.teachers.values())

    @property
    def publish_failures(self) -> int:
        """Publishes that failed (a full disk, an unreachable store), in this call or in the
        exchange's background writer."""
        return self._publish_failures + self.exchange.failures(self.replica)

    def teacher_versions(self) -> dict[int, int | None]:
        """``{peer: step of the loaded weights}`` (None where nothing is loaded yet)."""
        return {p: (t.version if (t := self.teachers.get(p)) else None) for p in self.peers}

    def staleness(self, step: int) -> dict[int, int | None]:
        """``{peer: steps since its loaded weights were published}``."""
        return {p: (t.staleness(step) if (t := self.teachers.get(p)) else None) for p in self.peers}

    # -- state ------------------------------------------------------------------------
    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """The teachers (version, manifest meta and, with ``weights``, whole weights; sharded
        teachers are gathered: every rank calls this then) and counters, for a checkpoint."""
        loaded = {p: t for p, t in self.teachers.items() if t.version is not None}
        return {
            "teachers": {p: {"version": t.version, "meta": t.meta, "ident": t.ident,
                             **({"state": full_state(t.module)} if weights else {})}
                         for p, t in loaded.items()},
            "bytes_published": self.bytes_published, "bytes_read": self.bytes_read,
            "sync_wait_s": self.sync_wait_s, "last_exchange": self.last_exchange,
            "publish_failures": self.publish_failures, "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the same teachers, so ψ continues where it was. A
        state without weights builds the teachers and records their versions; the caller
        then loads their weights (as :class:`~codistill.checkpoint.Checkpointer` does)."""
        for peer, t in state["teachers"].items():
            if "state" not in t:
                teacher = self._teacher(int(peer), t.get("meta", {}))
                teacher.version, teacher.meta = t["version"], t.get("meta", {})
                teacher.ident = t.get("ident", "")
                continue
            self._load(Published(int(peer), t["version"], t["state"], t.get("meta", {}),
                                 ident=t.get("ident", "")), count=False)
        self.bytes_published = state["bytes_published"]
        self.bytes_read = state["bytes_read"]
        self.sync_wait_s = state.get("sync_wait_s", 0.0)
        self.last_exchange = state.get("last_exchange")
        self._publish_failures = state.get("publish_failures", 0) - self.exchange.failures(self.replica)
        self.step = state.get("step", self.last_exchange or 0)

    def _default_teacher_factory(self, peer: int, meta: dict[str, Any]) -> nn.Module:
        spec = meta.get("model")
        return self._build_from_spec(spec) if spec else copy.deepcopy(unwrap(self.model))

    @staticmethod
    def _build_from_spec(spec: Any) -> nn.Module:
        if not isinstance(spec, dict):
            raise ValueError(f"model spec must be a mapping, got {spec!r}")
        from .models import build_model

        return build_model(spec)


def _model_nbytes(model: nn.Module) -> int:
    """Bytes of ``model``'s whole weights (a sharded model's global shapes)."""
    return sum(v.numel() * v.element_size() for v in unwrap(model).state_dict().values())
