"""Exchange through torch.distributed collectives (one-world mode).

At an exchange step every rank calls :meth:`CollectiveExchange.exchange`: each replica's
first rank broadcasts its weights to the other first ranks (the leaders group), then every
first rank passes its peers' weights on inside its own replica (:func:`share_in_replica`).
Replicas may have different architectures: names, shapes and dtypes travel first as small
objects, then one flat buffer per dtype, so every value arrives bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..topology import Groups, Topology
from .base import Published

Layout = list[tuple[str, list[int], str]]  # (name, shape, dtype) in state order


def layout_of(state: dict[str, torch.Tensor]) -> Layout:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def broadcast_state(
    state: dict[str, torch.Tensor] | None, layout: Layout, src: int, group: Any, device: str
) -> dict[str, torch.Tensor]:
    """Broadcast ``state`` (given on rank ``src``) with the known ``layout``; return it on
    every rank as CPU tensors. One collective per dtype."""
    dtypes = sorted({d for _, _, d in layout})
    out: dict[str, torch.Tensor] = {}
    for dtype in dtypes:
        names = [(k, s) for k, s, d in layout if d == dtype]
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
    return {k: out[k] for k, _, _ in layout}


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class CollectiveExchange:
    """Synchronous weight exchange among all replicas of one torch.distributed world."""

    def __init__(self, topo: Topology, groups: Groups, device: str = "cpu") -> None:
        if not topo.one_world:
            raise ValueError("the collective exchange needs every replica in one world (one torchrun job)")
        self.topo, self.groups, self.device = topo, groups, device
        self.bytes_sent = 0
        self.bytes_received = 0

    def exchange(self, step: int, state: dict[str, torch.Tensor] | None, meta: dict[str, Any]
                 ) -> dict[int, Published]:
        """Give this replica's weights (``state`` on its first rank); get every peer's."""
        topo = self.topo
        peers: dict[int, Published] = {}
        if topo.is_leader:
            assert state is not None
            infos: list[Any] = [None] * topo.num_replicas
            dist.all_gather_object(infos, (layout_of(state), meta), group=self.groups.leaders)
            for r in range(topo.num_replicas):
                r_layout, r_meta = infos[r]
                mine = r == topo.replica
                got = broadcast_state(state if mine else None, r_layout, topo.leader_rank(r),
                                      self.groups.leaders, self.device)
                if mine:
                    self.bytes_sent += _nbytes(got)
                else:
                    self.bytes_received += _nbytes(got)
                    peers[r] = Published(r, step, got, r_meta, _nbytes(got))
        return share_in_replica(peers if topo.is_leader else None, topo, self.groups, self.device,
                                self)


def share_in_replica(
    peers: dict[int, Published] | None, topo: Topology, groups: Groups, device: str = "cpu",
    counter: CollectiveExchange | None = None,
) -> dict[int, Published]:
    """The replica's first rank passes ``peers`` (its chosen teacher versions) on to every
    rank of the replica, so all ranks of one replica hold identical teachers."""
    if topo.workers == 1 or not dist.is_initialized():
        return peers or {}
    out = share_teachers(peers, topo.is_leader, topo.leader_rank(), groups.replica, device)
    if counter is not None and not topo.is_leader:
        counter.bytes_received += sum(_nbytes(p.state) for p in out.values())
    return out


def share_teachers(
    peers: dict[int, Published] | None, is_source: bool, src: int, group: Any, device: str = "cpu"
) -> dict[int, Published]:
    """Broadcast ``peers`` from global rank ``src`` to every rank of ``group``."""
    out = dict(peers or {}) if is_source else {}
    box: list[Any] = [None]
    if is_source:
        box = [{r: (p.step, p.meta, layout_of(p.state)) for r, p in out.items()}]
    dist.broadcast_object_list(box, src=src, group=group)
    for r, (step, r_meta, r_layout) in sorted(box[0].items()):
        state = out[r].state if is_source else None
        got = broadcast_state(state, r_layout, src, group, device)
        if not is_source:
            out[r] = Published(r, step, got, r_meta, _nbytes(got))
    return out
