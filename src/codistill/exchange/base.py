"""What every exchange offers: publish a replica's weights, find and load peers' versions."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

WARN_EACH = 5  # rejected versions of one replica warned about one by one (then at powers of ten)
CANDIDATES = 4  # versions of one peer a refresh tries, newest first (rejected ones are then skipped)
_UNSEEN = object()

Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype, shape)
Check = Callable[[Header, dict[str, Any]], None]  # (header, manifest meta); raises ValueError to reject


@dataclass
class Published:
    """One published version of a replica's weights. ``nbytes``: the tensor bytes it was
    stored as (what ``bytes_read`` counts; by default those of ``state``, which a decoded
    version no longer holds)."""

    replica: int
    step: int
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int | None = None
    ident: str = ""  # names this content: a step published again (after a crash) gets another

    def __post_init__(self) -> None:
        if self.nbytes is None:
            self.nbytes = state_nbytes(self.state)


@dataclass
class _Rejections:
    """An exchange's record of the versions it rejected."""

    warned: set[Any] = field(default_factory=set)  # keys warned about (a version's content)
    count: dict[int, int] = field(default_factory=dict)  # replica -> versions rejected
    bad: dict[tuple[int, int], Any] = field(default_factory=dict)  # (replica, step) -> token then
    listed: dict[int, dict[int, Any]] = field(default_factory=dict)  # replica -> its last listing


def state_nbytes(state: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors of a state dict (or of the tensors an iterable yields)."""
    tensors = state.values() if isinstance(state, Mapping) else state
    return sum(t.numel() * t.element_size() for t in tensors)


def header_of(state: dict[str, torch.Tensor]) -> Header:
    """Names, dtypes and shapes of ``state``, as a safetensors header describes them."""
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()}


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``dtype`` (e.g. ``"float32"``) and ``shape``."""
    n = getattr(torch, dtype).itemsize
    for d in shape:
        n *= d
    return n


def header_nbytes(header: Header) -> int:
    """Bytes of the tensors a header describes."""
    return sum(tensor_nbytes(dtype, shape) for dtype, shape in header.values())


class HostBuffers:
    """Host copies of a model's weights for a publish in flight, allocated once and reused
    (pinned when the weights live on an accelerator, so the copies are non-blocking).
    :meth:`put` fills one tensor; :meth:`state` returns them as a :class:`Staged` state."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self._copies: dict[str, torch.Tensor] = {}
        self._async = False

    def put(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        buf = self.buffers.get(name)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
            pin = value.device.type == "cuda"
            buf = self.buffers[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=pin)
        buf.copy_(value, non_blocking=value.device.type == "cuda")
        self._async |= value.device.type == "cuda"
        self._copies[name] = buf

    def state(self) -> Staged:
        event = None
        if self._async:
            event = torch.cuda.Event()
            event.record()
        out, self._copies, self._async = Staged(self._copies, event), {}, False
        return out


class Staged(dict):
    """A state whose device-to-host copies may still be running: :meth:`ready` waits."""

    def __init__(self, state: dict[str, torch.Tensor], event: Any = None) -> None:
        super().__init__(state)
        self.event = event

    def ready(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` once its copies have landed (see :class:`Staged`)."""
    if isinstance(state, Staged):
        state.ready()
    return state


class Exchange(ABC):
    """Where replicas publish their weights and read their peers'.

    ``holds_state``: ``publish`` returns before it has read the tensors it was given (a
    background writer), so the caller must hand over a copy it will not modify."""

    holds_state = False

    durable = True  # versions outlive the process (a resumed replica republishes a lost one)
    wait_seconds = 0.0  # time the training thread spent waiting for writes
    max_bytes: int | None = None  # versions larger than this are rejected before they are read
    poll_seconds = 0.2  # how often a prefetcher lists the peers' versions between exchanges

    @abstractmethod
    def publish(
        self, replica: int, step: int, state: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> int:
        """Store ``state`` as ``replica``'s version at ``step``; return the bytes written."""

    @abstractmethod
    def versions(self, replica: int) -> list[int]:
        """Steps of ``replica``'s published versions, oldest first (validity not checked)."""

    @abstractmethod
    def load(self, replica: int, step: int, check: Check | None = None) -> Published | None:
        """Load one version; None if it is missing, fails its integrity check, is larger than
        ``max_bytes`` or is refused by ``check`` (called with its tensors' names, dtypes and
        shapes and its meta before the tensors are read)."""

    def ident(self, replica: int, step: int) -> str | None:
        """The ident of ``replica``'s version ``step`` without loading its weights (None if
        it is missing)."""
        published = self.load(replica, step)
        return None if published is None else published.ident

    def failed(self, replica: int, step: int, error: Exception, unwritten: int = 0) -> None:
        """Count a write of ``replica``'s version ``step`` that failed (a full disk, an
        unreachable store): a warning, and training goes on (the next exchange publishes
        again). ``unwritten``: its tensor bytes when ``publish`` had already returned."""
        failures = self.__dict__.setdefault("_failures", {})
        failures[replica] = failures.get(replica, 0) + 1
        lost = self.__dict__.setdefault("_unwritten", {})
        lost[replica] = lost.get(replica, 0) + unwritten
        log.warning("replica %d: publishing step %d failed (%s); retried at the next exchange",
                    replica, step, error)

    def failures(self, replica: int) -> int:
        """Writes of ``replica``'s versions that failed (:meth:`failed`)."""
        return self.__dict__.get("_failures", {}).get(replica, 0)

    @property
    def publish_failures(self) -> int:
        """Writes that failed, of every replica."""
        return sum(self.__dict__.get("_failures", {}).values())

    def unwritten(self, replica: int) -> int:
        """Tensor bytes of ``replica``'s versions whose write failed after ``publish`` had
        returned (a background writer)."""
        return self.__dict__.get("_unwritten", {}).get(replica, 0)

    def limit(self, max_bytes: int | None) -> None:
        """Reject versions whose weights exceed ``max_bytes`` (None: no bound)."""
        self.max_bytes = max_bytes

    def listing(self, replica: int) -> dict[int, Any]:
        """``{step: token}`` of ``replica``'s versions, the token changing when a version is
        written again (default: None, as for an exchange whose versions never change)."""
        return dict.fromkeys(self.versions(replica))

    def candidates(self, replica: int) -> list[int]:
        """Steps of ``replica``'s versions, newest first, without those rejected before
        (unless written again since)."""
        listed = self.listing(replica)
        rejections = self._rejections()
        rejections.listed[replica] = listed
        return [s for s in sorted(listed, reverse=True)
                if rejections.bad.get((replica, s), _UNSEEN) != listed[s]]

    def refuse(self, replica: int, step: int, where: str, reason: str, key: Any = None) -> None:
        """Reject ``replica``'s version ``step``: :meth:`candidates` leaves it out until it is
        written again; warned about and counted once per ``key`` (default: the version), one
        by one for the first ``WARN_EACH`` of a replica, then at each power of ten."""
        rejections = self._rejections()
        rejections.bad[(replica, step)] = rejections.listed.get(replica, {}).get(step)
        key = (replica, step) if key is None else key
        if key in rejections.warned:
            return
        rejections.warned.add(key)
        n = rejections.count[replica] = rejections.count.get(replica, 0) + 1
        if n <= WARN_EACH:
            log.warning("skipping %s: %s", where, reason)
        elif n == WARN_EACH + 1 or f"{n}".strip("0") == "1":
            log.warning("skipping %d bad versions of replica %d so far (the last: %s: %s); counted in "
                        "rejected_versions, warned about again at each power of ten", n, replica, where,
                        reason)
        else:
            log.debug("skipping %s: %s", where, reason)

    def _refuse(self, key: Any, where: str, reason: str) -> None:
        """:meth:`refuse` of the version ``key`` = ``(replica, step, ...)`` names."""
        self.refuse(key[0], key[1], where, reason, key)

    def rejected(self, replica: int) -> int:
        """How many versions of ``replica`` were rejected (each counted once)."""
        return self._rejections().count.get(replica, 0)

    def _refused(self, key: Any) -> bool:
        return key in self._rejections().warned

    def _rejections(self) -> _Rejections:
        return self.__dict__.setdefault("_rejections_state", _Rejections())

    def _checked(self, published: Published, check: Check | None, where: str) -> Published | None:
        """``published`` if it passes the size bound and ``check``, else None (warned once)."""
        key = (published.replica, published.step, id(published))
        if self._refused(key):
            self.refuse(published.replica, published.step, where, "", key)
            return None
        header = header_of(published.state)
        try:
            if self.max_bytes is not None and (nbytes := header_nbytes(header)) > self.max_bytes:
                raise ValueError(f"{nbytes} bytes of weights exceed the bound of {self.max_bytes}")
            if check is not None:
                check(header, published.meta)
        except ValueError as e:
            self.refuse(published.replica, published.step, where, str(e), key)
            return None
        return published

    def clear(self, replica: int) -> None:
        """Delete every published version of ``replica`` (a fresh start of that replica)."""
        raise NotImplementedError(f"{type(self).__name__} cannot clear versions")

    def flush(self) -> None:
        """Wait until every version published so far is readable."""

    def close(self) -> None:
        """Wait for pending writes and release resources."""
