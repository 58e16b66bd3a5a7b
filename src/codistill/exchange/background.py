"""Publish without blocking training: a single background writer per replica."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .base import Check, Exchange, Published, ready, state_nbytes

log = logging.getLogger(__name__)


class BackgroundExchange(Exchange):
    """Wraps an exchange so that ``publish`` returns at once and the write runs on a thread.

    The caller hands over a host copy of the weights that it will not modify until the next
    publish (:class:`~codistill.exchange.base.HostBuffers`; device copies may still be landing:
    the writer waits for them). At most one write is in flight:
    a new publish first waits for the previous one, so versions land in order. A write that
    fails with an ``OSError`` (full disk, unreachable store) is a warning and counts in
    :meth:`failures`; training goes on and the next publish is the retry.
    """

    holds_state = True

    def __init__(self, inner: Exchange) -> None:
        self.inner = inner
        self.durable = inner.durable
        self.poll_seconds = inner.poll_seconds
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codistill-publish")
        self._pending: Future | None = None
        self.last_write_seconds = 0.0
        self.wait_seconds = 0.0  # time training spent waiting for a previous write

    def _write(self, replica: int, step: int, state: dict[str, torch.Tensor], meta: dict) -> int:
        t0 = time.perf_counter()
        try:
            n = self.inner.publish(replica, step, ready(state), meta)
        except OSError as e:
            self.failed(replica, step, e, state_nbytes(state))
            return 0
        self.last_write_seconds = time.perf_counter() - t0
        log.debug("published replica %d step %d (%d bytes, %.3fs)", replica, step, n,
                  self.last_write_seconds)
        return n

    def publish(
        self, replica: int, step: int, state: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> int:
        self.flush()
        self._pending = self._pool.submit(self._write, replica, step, state, meta)
        return state_nbytes(state)

    def flush(self) -> None:
        """Wait for the write in flight, re-raising an error other than a failed write."""
        if self._pending is not None:
            t0 = time.perf_counter()
            try:
                self._pending.result()
            finally:
                self._pending = None
                self.wait_seconds += time.perf_counter() - t0

    def versions(self, replica: int) -> list[int]:
        return self.inner.versions(replica)

    def load(self, replica: int, step: int, check: Check | None = None) -> Published | None:
        return self.inner.load(replica, step, check)

    def ident(self, replica: int, step: int) -> str | None:
        return self.inner.ident(replica, step)

    def candidates(self, replica: int) -> list[int]:
        return self.inner.candidates(replica)

    def refuse(self, replica: int, step: int, where: str, reason: str, key: Any = None) -> None:
        self.inner.refuse(replica, step, where, reason, key)

    def rejected(self, replica: int) -> int:
        return self.inner.rejected(replica)

    def limit(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.inner.limit(max_bytes)

    def clear(self, replica: int) -> None:
        self.flush()
        self.inner.clear(replica)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)
            self.inner.close()
