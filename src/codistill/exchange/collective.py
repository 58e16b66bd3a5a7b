"""Exchange through torch.distributed collectives (one-world mode).

:class:`CollectiveExchange` is an :class:`Exchange` on the replicas' first ranks: ``publish``
is a collective among them (every first rank calls it at the same exchange step), after
which every peer's version of that step is held in memory for ``versions`` / ``load``.
:func:`share_teachers` passes a first rank's chosen teachers on inside its replica.
Replicas may have different architectures: names, dtypes and shapes (a :data:`Header`, in
state order) travel first as small objects, then one flat buffer per dtype, so every value
arrives bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..topology import Groups, Topology
from .base import Header, Published, header_of, state_nbytes
from .memory import MemoryExchange


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def broadcast_state(
    state: dict[str, torch.Tensor] | None, header: Header, src: int, group: Any, device: str
) -> dict[str, torch.Tensor]:
    """Broadcast ``state`` (given on rank ``src``) with the known ``header`` (in state
    order); return it on every rank as CPU tensors. One collective per dtype."""
    dtypes = sorted({d for d, _ in header.values()})
    out: dict[str, torch.Tensor] = {}
    for dtype in dtypes:
        names = [(k, s) for k, (d, s) in header.items() if d == dtype]
        if state is not None:
            buf = torch.cat([state[k].detach().reshape(-1) for k, _ in names]).to(device)
        else:
            buf = torch.empty(sum(_numel(s) for _, s in names), dtype=getattr(torch, dtype),
                              device=device)
        dist.broadcast(buf, src=src, group=group)
        buf, i = buf.cpu(), 0
        for k, s in names:
            out[k] = buf[i : i + _numel(s)].reshape(s).clone()
            i += _numel(s)
    return {k: out[k] for k in header}


class CollectiveExchange(MemoryExchange):
    """Synchronous weight exchange among the first ranks of all replicas of one world (the
    bytes a replica sends and reads are its codistiller's ``bytes_published`` / ``bytes_read``)."""

    def __init__(self, topo: Topology, groups: Groups, device: str = "cpu", keep: int = 2) -> None:
        if not topo.one_world:
            raise ValueError("the collective exchange needs every replica in one world (one torchrun job)")
        super().__init__(keep=keep)
        self.topo, self.groups, self.device = topo, groups, device

    def publish(self, replica: int, step: int, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
        """Give this replica's weights to every other first rank; receive theirs."""
        topo = self.topo
        if not topo.is_leader or replica != topo.replica:
            raise RuntimeError("CollectiveExchange.publish runs on a replica's first rank, for its replica")
        infos: list[Any] = [None] * topo.num_replicas
        dist.all_gather_object(infos, (step, header_of(state), meta), group=self.groups.leaders)
        for r, (r_step, r_header, r_meta) in enumerate(infos):
            if r_step != step:
                raise RuntimeError(f"collective exchange: replica {r} published step {r_step} while "
                                   f"replica {replica} published step {step}")
            mine = r == replica
            got = broadcast_state(state if mine else None, r_header, topo.leader_rank(r),
                                  self.groups.leaders, self.device)
            if not mine:  # (its own version stays with the replica: nothing reads it here)
                super().publish(r, step, got, r_meta)
        return state_nbytes(state)


def share_teachers(
    peers: dict[int, Published] | None, is_source: bool, src: int, group: Any, device: str = "cpu"
) -> dict[int, Published]:
    """Broadcast ``peers`` from global rank ``src`` to every rank of ``group``."""
    out = dict(peers or {}) if is_source else {}
    box: list[Any] = [None]
    if is_source:
        box = [{r: (p.step, p.meta, header_of(p.state), p.nbytes) for r, p in out.items()}]
    dist.broadcast_object_list(box, src=src, group=group)
    for r, (step, r_meta, r_header, nbytes) in sorted(box[0].items()):
        state = out[r].state if is_source else None
        got = broadcast_state(state, r_header, src, group, device)
        if not is_source:
            out[r] = Published(r, step, got, r_meta, nbytes)
    return out
