"""Teachers: frozen, stale local copies of the peers, and their averaged predictions."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .exchange import Published, compression
from .exchange.base import Check, Header, header_nbytes, header_of
from .losses import DistillLoss, predict_probs
from .modules import call_model, unwrap
from .parallel import full_state, is_sharded, load_full_state

log = logging.getLogger(__name__)


def finite(t: torch.Tensor) -> bool:
    """True if every element of ``t`` is finite: one sum (a NaN or infinity makes it
    non-finite), and the exact test only when the sum is not finite (it may overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with every parameter excluded from autograd."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Teacher:
    """A frozen copy of one peer, loaded in place from that peer's published weights.

    ``module`` may be cast (``teacher_dtype``) or sharded across the replica's ranks;
    ``header`` then names the peer's weights as its model holds them (default: ``module``'s;
    a compressed version stores them as :func:`~codistill.exchange.compression.stored_header`
    says)."""

    def __init__(self, peer: int, module: nn.Module, header: Header | None = None,
                 forward: Callable[..., Any] | None = None, stateful: bool = False) -> None:
        self.peer = peer
        self.forward = forward or call_model  # module, inputs[, state] -> output[, state]
        self.stateful = stateful
        self.state: Any = None  # a stateful forward's state (e.g. an RNN's hidden state)
        self.module = freeze(module)
        self.header = header if header is not None else header_of(module.state_dict())
        self.sharded = is_sharded(module)
        param = next(iter(module.parameters()), None)  # the forward's autocast: the teacher's own dtype
        self._device_type = param.device.type if param is not None else "cpu"
        self._bf16 = param is not None and param.dtype == torch.bfloat16
        self.version: int | None = None  # step at which the loaded weights were published
        self.meta: dict[str, Any] = {}  # the peer's manifest meta (its model spec), without its publish dtype
        self.ident = ""  # the loaded version's ident (see Published.ident)
        self.dropped = False  # the loaded version predicted non-finite values: left out of ψ
        self.drops = 0  # versions dropped so far

    def load(self, published: Published, src: int | None = None, group: Any = None) -> None:
        """Copy ``published`` weights into the preallocated module (no rebuild), decoded from
        its publish dtype and cast to the module's dtype. A sharded teacher: every rank of the
        replica calls this together, the weights given on global rank ``src`` of ``group`` (an
        empty state elsewhere)."""
        # (a prefetched version is decoded already: its meta declares fp32)
        state = compression.decode(published.state, compression.declared(published.meta))
        try:
            if self.sharded:
                load_full_state(self.module, state or None, src, group)
            else:
                self.module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"published weights of replica {published.replica} at step {published.step} "
                f"do not fit its teacher module: {e}"
            ) from e
        freeze(self.module)
        self.dropped = False
        self.state = None  # new weights start from a fresh state
        self.version = published.step
        self.meta = compression.untagged(published.meta)  # the meta of the decoded weights it holds
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
    def logits(self, inputs: Any) -> torch.Tensor:
        """The teacher's prediction on ``inputs`` as logits, its forward run in its own dtype
        (whatever autocast the student's step is under)."""
        with torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=self._bf16):
            if self.stateful:
                out, self.state = self.forward(self.module, inputs, self.state)
            else:
                out = self.forward(self.module, inputs)
        return out

    def predict(self, inputs: Any, kind: str, temperature: float = 1.0) -> torch.Tensor:
        """The teacher's predicted probabilities (in fp32)."""
        return predict_probs(self.logits(inputs).float(), kind, temperature)

    @torch.no_grad()
    def features(self, inputs: Any, hidden: Callable[[nn.Module, Any], torch.Tensor],
                 head: Callable[[nn.Module], Any]) -> tuple[torch.Tensor, Any]:
        """(hidden states, head) of the teacher on ``inputs``: its prediction is ``head(hidden)``."""
        with torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=self._bf16):
            return hidden(self.module, inputs), head(self.module)


def teacher_outputs(teachers: list[Teacher], call: Callable[[Teacher], Any],
                    values: Callable[[Any], torch.Tensor] | None = lambda out: out) -> list[Any] | None:
    """``call(t)`` for each loaded teacher (its logits, or its hidden states and head); raises
    if none is loaded, None if every one is dropped. A teacher whose output (``values`` of it;
    None: not checked here) is not finite (weights that are finite but overflow in its forward)
    is dropped (:func:`drop`). The test is one reduction per teacher (:func:`finite`)."""
    loaded = [t for t in teachers if t.version is not None]
    if not loaded:
        raise RuntimeError("no teacher has weights loaded yet")
    outs = []
    for t in loaded:
        if t.dropped and not t.sharded:
            continue
        out = call(t)  # a sharded forward is collective: every rank runs it
        if t.dropped:
            continue
        if values is not None and not finite(values(out)):
            drop(t)
            continue
        outs.append(out)
    return outs or None


def drop(t: Teacher) -> None:
    """Leave ``t`` out of ψ, from this step until its peer's next version is loaded, with a
    warning naming the peer: its predictions are not finite."""
    t.dropped, t.drops = True, t.drops + 1
    log.warning("the teacher of peer %d (its version of step %d) predicts non-finite values; "
                "distilling without it until peer %d publishes a newer version", t.peer, t.version, t.peer)


@torch.no_grad()
def average_predictions(
    teachers: list[Teacher], inputs: Any, kind: str, temperature: float = 1.0
) -> torch.Tensor | None:
    """mean_j p_j(x) over the loaded teachers (fp32); raises if none is loaded, None if every
    one is dropped (see :func:`teacher_outputs`). ψ itself reads the teachers' logits instead
    (:func:`codistill.fused.fused_loss`), without this [rows, classes] tensor."""
    logits = teacher_outputs(teachers, lambda t: t.logits(inputs))
    if logits is None:
        return None
    total = predict_probs(logits[0].float(), kind, temperature)
    for z in logits[1:]:
        total.add_(predict_probs(z.float(), kind, temperature))
    return total.div_(len(logits)) if len(logits) > 1 else total


@dataclass(frozen=True)
class TeacherSpec:
    """How a Codistiller builds and runs its teachers.

    Args:
        factory: ``f(peer, meta) -> module`` builds an empty teacher for ``peer`` (``meta``:
            the peer's manifest meta; the teacher is moved to the model's device); default:
            built from the ``model`` spec the peer publishes (untrusted: its header is checked
            against a skeleton built on the meta device), or a copy of the model.
        forward: ``f(module, inputs) -> output`` calls a teacher (default: ``module(x)`` for a
            tensor, ``module(*x)`` for a tuple, ``module(**x)`` for a dict); e.g. a recurrent
            model that needs a fresh state on batch-first input:
            ``lambda m, x: m(x, m.init_hidden(x.size(0)))`` (seq-first: ``x.size(1)``). The
            prediction is then found in the output as :func:`codistill.losses.prediction` does.
            The Codistiller checks it once, at the first ``distill_loss``, on the student's
            own model: the prediction must have the student's shape.
        stateful: ``forward`` is ``f(module, inputs, state) -> (output, state)`` and each
            teacher carries its state from batch to batch, as a student that carries an RNN's
            hidden state does (``state`` is None at first and after each new version is loaded;
            it is computed without gradients). E.g.
            ``lambda m, x, h: m(x, h if h is not None else m.init_hidden(x.size(1)))``.
        dtype: store and run teachers in this dtype (e.g. ``torch.bfloat16``); a peer's
            version, whatever its publish dtype, is decoded and cast into it. None: as built.
        layout: ``f(module) -> module`` lays a new teacher out over the replica's ranks, e.g.
            :func:`codistill.parallel.shard_model` (FSDP2): each rank holds a shard of every
            teacher.
        peers: which replicas to distil from (default: all others).
        hidden, head: for :meth:`Codistiller.linear_loss` (ψ from hidden states, with no
            [tokens, vocabulary] tensor): ``hidden(module, inputs)`` gives a teacher's last
            hidden states and ``head(module)`` its output layer (an ``nn.Linear`` or its
            weight), e.g. for a Hugging Face causal LM ``lambda m, x: m.base_model(**x)[0]``
            and ``lambda m: m.get_output_embeddings()``.
    """

    factory: Callable[[int, dict[str, Any]], nn.Module] | None = None
    forward: Callable[..., Any] | None = None
    stateful: bool = False
    dtype: torch.dtype | None = None
    layout: Callable[[nn.Module], nn.Module] | None = None
    peers: list[int] | None = None
    hidden: Callable[[nn.Module, Any], torch.Tensor] | None = None
    head: Callable[[nn.Module], Any] | None = None


class TeacherSet(dict[int, Teacher]):
    """One replica's teachers, ``{peer: Teacher}``, each built on first use from ``spec``:
    the checks a peer's version passes before it is read, loading, the averaged prediction,
    and the state of a checkpoint. ``bytes_read`` counts the stored tensor bytes loaded."""

    def __init__(self, model: nn.Module, spec: TeacherSpec, loss: DistillLoss, max_bytes: int) -> None:
        super().__init__()
        self.model, self.spec, self.loss, self.max_bytes = model, spec, loss, max_bytes
        self.bytes_read = 0
        self._unchecked: list[tuple[Teacher, torch.Tensor]] = []  # the last logits(check=False)

    def versions(self, peers: list[int]) -> dict[int, int | None]:
        """``{peer: step of the loaded weights}`` (None where nothing is loaded yet)."""
        return {p: (t.version if (t := self.get(p)) else None) for p in peers}

    def staleness(self, peers: list[int], step: int) -> dict[int, int | None]:
        """``{peer: steps since its loaded weights were published}``."""
        return {p: (t.staleness(step) if (t := self.get(p)) else None) for p in peers}

    @property
    def drops(self) -> int:
        """Versions dropped for non-finite predictions."""
        return sum(t.drops for t in self.values())

    def average(self, inputs: Any) -> torch.Tensor | None:
        """The loaded teachers' averaged predictions on ``inputs`` (None when none is loaded
        or every one is dropped), see :func:`average_predictions`."""
        if not any(t.version is not None for t in self.values()):
            return None
        return average_predictions(list(self.values()), inputs, self.loss.kind, self.loss.temperature)

    def logits(self, inputs: Any, check: bool = True) -> list[torch.Tensor] | None:
        """Each loaded, finite teacher's logits on ``inputs`` (None when none is loaded or every
        one is dropped), see :func:`teacher_outputs`. ``check=False`` leaves the test of
        finiteness to the caller: a loss that comes out finite needs none (one number read
        instead of a reduction per teacher); otherwise :meth:`drop_nonfinite` finds the culprits."""
        if not any(t.version is not None for t in self.values()):
            return None
        if check:
            return teacher_outputs(list(self.values()), lambda t: t.logits(inputs))
        pairs = teacher_outputs(list(self.values()), lambda t: (t, t.logits(inputs)), values=None)
        self._unchecked = pairs or []
        return [z for _, z in self._unchecked] or None

    def release(self) -> None:
        """Forget the last ``logits(check=False)`` (they are [rows, classes] per teacher)."""
        self._unchecked = []

    def drop_nonfinite(self) -> list[torch.Tensor] | None:
        """Of the logits the last ``logits(check=False)`` gave, those that are finite; the
        teachers of the others are dropped (:func:`drop`). None if none is left."""
        kept = []
        for t, z in self._unchecked:
            if finite(z):
                kept.append(z)
            else:
                drop(t)
        return kept or None

    def features(self, inputs: Any) -> list[tuple[torch.Tensor, Any]] | None:
        """Each loaded, finite teacher's (hidden states, head) on ``inputs``, by the spec's
        ``hidden`` and ``head`` (None when none is loaded or every one is dropped)."""
        if self.spec.hidden is None or self.spec.head is None:
            raise ValueError("a loss from hidden states needs TeacherSpec(hidden=f(module, inputs) -> hidden "
                             "states, head=f(module) -> the output layer) to call the teachers alike")
        if not any(t.version is not None for t in self.values()):
            return None
        hidden, head = self.spec.hidden, self.spec.head
        return teacher_outputs(list(self.values()), lambda t: t.features(inputs, hidden, head),
                               values=lambda out: out[0])

    # -- checks and loads ----------------------------------------------------------------
    def check(self, peer: int) -> Check:
        """The test a peer's version must pass before its tensors are read, on what it
        stores: at most ``max_bytes``, the dtypes its declared publish dtype stores, and the
        stored form of its teacher's names, dtypes and shapes (for a teacher not built yet: of
        the module its manifest's spec describes, built without memory)."""

        def check(header: Header, meta: dict[str, Any]) -> None:
            nbytes = header_nbytes(header)
            if nbytes > self.max_bytes:
                raise ValueError(f"{nbytes} bytes of weights exceed max_teacher_bytes={self.max_bytes}")
            dtype = compression.declared(meta)
            compression.check_stored(header, dtype)
            held = self._expected_header(peer, meta)
            if held is None:
                return
            expected = compression.stored_header(held, dtype)
            if header != expected:
                missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
                wrong = sorted(k for k in set(header) & set(expected) if header[k] != expected[k])
                raise ValueError(f"weights do not fit the teacher (missing {missing[:3]}, unexpected "
                                 f"{extra[:3]}, other dtype/shape {wrong[:3]})")

        return check

    def _expected_header(self, peer: int, meta: dict[str, Any]) -> Header | None:
        """The weights ``peer``'s teacher takes, as its model holds them (None: a caller's
        factory decides, and :meth:`Teacher.load` checks them after reading)."""
        teacher = self.get(peer)
        if teacher is not None:
            return teacher.header
        if self.spec.factory is None:  # built from a manifest's (untrusted) spec
            return self._skeleton_header(meta)
        return None

    def accept(self, published: Published) -> Teacher | None:
        """The teacher ``published`` is to be loaded into (built on first use); None if it
        holds that version already. ValueError for non-finite weights (a diverged peer: its
        last finite version stays) or int8 scales out of range."""
        teacher = self.get(published.replica)
        if teacher is not None and teacher.version == published.step and teacher.ident == published.ident:
            return None
        bad = [k for k, v in published.state.items() if v.is_floating_point() and not finite(v)]
        if bad:
            raise ValueError(f"non-finite weights ({', '.join(bad[:3])})")
        compression.check_values(published.state, compression.declared(published.meta))
        return self.build(published.replica, published.meta)

    def load(self, published: Published, count: bool = True) -> None:
        """Load a peer's published weights into its teacher (``count``: its stored bytes in
        ``bytes_read``)."""
        teacher = self.accept(published)
        if teacher is None:
            return
        teacher.load(published)
        if count:
            self.bytes_read += published.nbytes
        log.debug("loaded peer %d at step %d", published.replica, published.step)

    def build(self, peer: int, meta: dict[str, Any]) -> Teacher:
        """``peer``'s teacher, built on first use: the factory's module on the model's device,
        cast to ``spec.dtype`` and laid out by ``spec.layout`` (e.g. sharded: each rank then
        keeps only its shards)."""
        teacher = self.get(peer)
        if teacher is not None:
            return teacher
        try:
            with torch.random.fork_rng(devices=[]):  # building a teacher draws no training RNG
                module = (self.spec.factory or self._from_meta)(peer, meta)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"cannot build a teacher from its manifest: {e}") from e
        header = header_of(module.state_dict())  # as the peer publishes it
        # Built whole, not on the meta device: buffers outside the state dict (a model's
        # constants) would otherwise be left uninitialised.
        module = module.to(next(iter(self.model.parameters()), torch.empty(0)).device)
        if self.spec.dtype is not None:
            module = module.to(self.spec.dtype)
        if self.spec.layout is not None:
            module = self.spec.layout(module)
        teacher = self[peer] = Teacher(peer, module, header, self.predict, self.spec.stateful)
        return teacher

    def predict(self, module: nn.Module, inputs: Any, *state: Any) -> Any:
        """``module``'s prediction on ``inputs`` as logits, called as a teacher is (with
        ``spec.stateful``: given its state, returning ``(logits, state)``)."""
        forward = self.spec.forward or call_model
        if self.spec.stateful:
            out, new_state = forward(module, inputs, *state)
            return self.loss.logits(out), new_state
        return self.loss.logits(forward(module, inputs))

    def _from_meta(self, peer: int, meta: dict[str, Any]) -> nn.Module:
        spec = meta.get("model")
        return _build_from_spec(spec) if spec else copy.deepcopy(unwrap(self.model))

    def _skeleton_header(self, meta: dict[str, Any]) -> Header:
        """Names, dtypes and shapes of the teacher the default factory would build from
        ``meta``, built on the meta device (allocates nothing, whatever the spec claims)."""
        spec = meta.get("model")
        if not spec:
            return header_of(unwrap(self.model).state_dict())
        try:
            with torch.device("meta"):
                module = _build_from_spec(spec)
        except Exception as e:  # a hostile spec may fail anywhere in a model's constructor
            raise ValueError(f"cannot build a teacher from the manifest's model spec: {e}") from e
        return header_of(module.state_dict())

    # -- state ---------------------------------------------------------------------------
    def state(self, weights: bool = True) -> dict[int, dict[str, Any]]:
        """The loaded teachers: version, manifest meta and, with ``weights``, whole weights
        (sharded teachers are gathered: every rank calls this then)."""
        return {p: {"version": t.version, "meta": t.meta, "ident": t.ident,
                    **({"state": full_state(t.module)} if weights else {})}
                for p, t in self.items() if t.version is not None}

    def load_state(self, state: dict[Any, dict[str, Any]]) -> None:
        """Restore :meth:`state`. Without weights the teachers are built and their versions
        recorded; the caller then loads their weights."""
        for peer, t in state.items():
            if "state" not in t:
                teacher = self.build(int(peer), t.get("meta", {}))
                teacher.version, teacher.meta = t["version"], t.get("meta", {})
                teacher.ident = t.get("ident", "")
                continue
            self.load(Published(int(peer), t["version"], t["state"], t.get("meta", {}),
                                ident=t.get("ident", "")), count=False)


def _build_from_spec(spec: Any) -> nn.Module:
    if not isinstance(spec, dict):
        raise ValueError(f"model spec must be a mapping, got {spec!r}")
    from .models import build_model

    return build_model(spec)
