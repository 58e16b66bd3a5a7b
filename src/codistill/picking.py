"""Which of its peers' versions a replica loads at a refresh: the policies and the picker.

* :class:`Newest`: each peer's newest valid version (replicas run asynchronously);
* :class:`LockStep`: at step S, exactly every peer's version S, waiting for it;
* :class:`BoundedDrift`: the newest, after waiting until no peer is more than ``steps``
  steps behind this replica.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .exchange import Exchange, Published
from .exchange.base import CANDIDATES
from .exchange.prefetch import Prefetcher
from .teachers import TeacherSet

log = logging.getLogger(__name__)

POLL_SECONDS = 0.02  # how often a waiting replica lists its peers' versions


@dataclass(frozen=True)
class Newest:
    """Load each peer's newest valid version. ``prefetch``: read peers' new versions in a
    background thread between exchanges, so a refresh only copies them into the teachers
    (default: on for exchanges that outlive the process, i.e. directories and URLs)."""

    prefetch: bool | None = None

    def wait(self, picker: VersionPicker, step: int) -> dict[int, int] | None:
        """Wait as the policy asks before a refresh at ``step``; the exact versions to load,
        or None for the newest."""
        return None


@dataclass(frozen=True)
class LockStep:
    """Lock-step replicas: a refresh at step S waits (at most ``timeout`` seconds) for every
    peer's version S and loads exactly those (``prefetch``: as :class:`Newest`'s, default off)."""

    timeout: float = 600.0
    prefetch: bool | None = None

    def wait(self, picker: VersionPicker, step: int) -> dict[int, int] | None:
        picker.exchange.flush()
        picker.wait_until(lambda p: step in picker.exchange.versions(p), self.timeout,
                          lambda behind: f"codistill.sync: replicas {behind} did not publish step {step} "
                                         f"within {self.timeout:g}s")
        return dict.fromkeys(picker.peers, step)


@dataclass(frozen=True)
class BoundedDrift:
    """Asynchronous replicas that run at most ``steps`` steps ahead of their slowest peer: at
    an exchange, wait (at most ``timeout`` seconds) until every peer has published a version
    no more than ``steps`` behind, then load the newest (0: never wait)."""

    steps: int
    timeout: float = 600.0
    prefetch: bool | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"max_drift must be >= 0, got {self.steps}")

    def wait(self, picker: VersionPicker, step: int) -> dict[int, int] | None:
        k = picker.exchange_every
        target = (step - self.steps) // k * k
        if not self.steps or target <= 0 or not picker.due(target):
            return None
        picker.wait_until(
            lambda p: max(picker.exchange.versions(p), default=-1) >= target, self.timeout,
            lambda behind: f"codistill.max_drift: replica {picker.replica} is at step {step}, and replicas "
                           f"{behind} have not published step {target} within {self.timeout:g}s (a "
                           f"replica may run at most max_drift={self.steps} steps ahead of its slowest "
                           "peer; is a peer down?)")
        return None


Policy = Newest | LockStep | BoundedDrift


class VersionPicker:
    """Picks the peers' versions a refresh loads, as ``policy`` says, reading ahead between
    refreshes (:class:`~codistill.exchange.prefetch.Prefetcher`) when the policy's
    ``prefetch`` is on. ``due(step)``: whether ``step`` is an exchange step at which
    distillation is on (a drift bound waits only for those). ``wait_s``: seconds spent
    waiting for peers."""

    def __init__(self, exchange: Exchange, peers: list[int], policy: Policy, exchange_every: int,
                 replica: int, due: Callable[[int], bool]) -> None:
        self.exchange, self.peers, self.policy = exchange, peers, policy
        self.exchange_every, self.replica, self.due = exchange_every, replica, due
        self.wait_s = 0.0
        prefetch = policy.prefetch
        if prefetch is None:
            prefetch = exchange.durable and not isinstance(policy, LockStep)
        self.prefetcher = Prefetcher(exchange) if prefetch else None

    def pick(self, step: int | None, teachers: TeacherSet, load: Callable[[Published], None]) -> None:
        """Choose the versions of a refresh at ``step`` (None: no waiting, the newest) and
        hand each to ``load`` (which raises ValueError for a version that must not be used)."""
        self.stop()
        exact = self.policy.wait(self, step) if step is not None else None
        if exact is not None:
            self._load_exact(exact, teachers, load)
        else:
            self._load_newest(teachers, load)

    def watch(self, teachers: TeacherSet) -> None:
        """Read ahead the peers' versions newer than the loaded ones, until the next pick."""
        if self.prefetcher is not None:
            self.prefetcher.start(teachers.versions(self.peers), teachers.check)

    def stop(self) -> None:
        """Stop reading ahead."""
        if self.prefetcher is not None:
            self.prefetcher.stop()

    def wait_until(self, ready: Callable[[int], bool], timeout: float,
                   message: Callable[[list[int]], str]) -> None:
        """Poll until ``ready(peer)`` holds for every peer; TimeoutError(``message(behind)``)
        after ``timeout`` seconds. The time waited counts in ``wait_s``."""
        t0 = time.perf_counter()
        behind = list(self.peers)
        while behind := [p for p in behind if not ready(p)]:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(message(behind))
            time.sleep(POLL_SECONDS)
        self.wait_s += time.perf_counter() - t0

    def _load_exact(self, versions: dict[int, int], teachers: TeacherSet,
                    load: Callable[[Published], None]) -> None:
        for peer, want in versions.items():
            teacher = teachers.get(peer)
            if teacher is not None and teacher.version == want:
                continue
            published = self.exchange.load(peer, want, teachers.check(peer))
            if published is None:
                raise RuntimeError(f"replica {self.replica}: version {want} of peer {peer} is "
                                   "missing or invalid in the exchange")
            load(published)

    def _load_newest(self, teachers: TeacherSet, load: Callable[[Published], None]) -> None:
        """Load each peer's newest valid version, trying at most ``CANDIDATES`` of its
        versions per refresh (rejected ones are remembered and not tried again)."""
        for peer in self.peers:
            teacher = teachers.get(peer)
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
                published = self.prefetcher.take(peer, step, self.exchange.ident(peer, step)) \
                    if self.prefetcher is not None else None
                if published is None:
                    published = self.exchange.load(peer, step, teachers.check(peer))
                if published is None:
                    continue
                try:
                    load(published)
                    break
                except ValueError as e:  # a peer's bad version must not stop this replica
                    self.exchange.refuse(peer, step, f"peer {peer} step {step}", str(e),
                                         (peer, step, "loaded", published.ident))
