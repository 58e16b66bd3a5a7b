"""Publishing one replica's weights to the exchange, off the step where it can."""

from __future__ import annotations

from typing import Any

from torch import nn

from .exchange import Exchange, signing, state_nbytes
from .exchange.base import HostBuffers
from .exchange.compression import encoder, tagged
from .parallel import full_state, is_sharded
from .replica_group import ReplicaGroup


class Publisher:
    """Publishes ``model`` as ``replica``'s versions, with ``model_spec`` in their meta (so
    that peers can build its teacher), stored in ``dtype`` (fp32: as held; bf16, int8:
    compressed on the weights' device, :mod:`~codistill.exchange.compression`). A background
    writer gets a copy in reused host buffers; a sharded model is gathered by every rank of
    ``group``, one tensor at a time, and published by the first. ``bytes_published`` and
    ``failures`` count this replica's stored bytes written and writes failed (the exchange's
    count, which a background writer updates once a write has failed)."""

    def __init__(self, model: nn.Module, exchange: Exchange, replica: int, model_spec: dict[str, Any] | None,
                 group: ReplicaGroup, dtype: str = "fp32") -> None:
        self.model, self.exchange, self.replica = model, exchange, replica
        self.model_spec, self.group = model_spec, group
        self.dtype, self._encode = dtype, encoder(dtype)
        self._host = HostBuffers()  # reused host copies of the weights for a publish in flight
        self.bytes_published = 0
        self.failures = 0

    @property
    def bytes_published(self) -> int:
        """Stored tensor bytes of the versions written (a write that failed in the background
        is taken back once it has failed)."""
        return self._published - (self.exchange.unwritten(self.replica) - self._unwritten)

    @bytes_published.setter
    def bytes_published(self, n: int) -> None:
        self._published, self._unwritten = n, self.exchange.unwritten(self.replica)

    @property
    def failures(self) -> int:
        """Publishes that failed (a full disk, an unreachable store), in :meth:`publish` or
        in the exchange's background writer."""
        return self._failures + self.exchange.failures(self.replica)

    @failures.setter
    def failures(self, n: int) -> None:
        self._failures = n - self.exchange.failures(self.replica)

    def publish(self, step: int) -> int:
        """Publish the weights as the version at ``step``; return the stored bytes (0 on a
        rank that is not its replica's first, and for a write that failed: a warning)."""
        leads = self.group.leads
        if not leads and not is_sharded(self.model):
            return 0
        if self.exchange.holds_state:  # a background writer: a copy, in buffers its last write freed
            self.exchange.flush()
            state = full_state(self.model, leads, host=self._host, encode=self._encode)
        else:  # the exchange reads the weights before it returns
            state = full_state(self.model, leads, copy=False, encode=self._encode)
        if state is None:  # a sharded model is gathered by every rank; the first one publishes
            return 0
        meta = tagged({"replica": self.replica, "model": self.model_spec}, self.dtype)
        signing.note_published(self.exchange, step)  # before a background write lands
        try:
            self.exchange.publish(self.replica, step, state, meta)
        except OSError as e:  # a full disk or an unreachable store must not end the run
            self.exchange.failed(self.replica, step, e)
            return 0
        n = state_nbytes(state)  # stored tensor bytes, the same unit as bytes_read
        self.bytes_published += n
        return n
