"""Exchange through torch.distributed collectives (one-world mode).

At an exchange step every rank calls :meth:`CollectiveExchange.exchange`: each replica's
first rank broadcasts its flattened weights to the other first ranks (the leaders group),
then every first rank broadcasts its peers' weights inside its own replica. Replicas may
have different architectures: shapes travel first as small objects.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..topology import Groups, Topology
from .base import Published


def _flatten(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state.values()])


def _unflatten(flat: torch.Tensor, layout: list[tuple[str, list[int], str]]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape, dtype in layout:
        n = 1
        for d in shape:
            n *= d
        out[name] = flat[i : i + n].reshape(shape).to(getattr(torch, dtype)).clone()
        i += n
    return out


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
            layout = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]
            infos: list[Any] = [None] * topo.num_replicas
            dist.all_gather_object(infos, (layout, meta), group=self.groups.leaders)
            for r in range(topo.num_replicas):
                r_layout, r_meta = infos[r]
                if r == topo.replica:
                    buf = _flatten(state).to(self.device)
                    self.bytes_sent += buf.numel() * 4
                else:
                    buf = torch.empty(sum(_numel(s) for _, s, _ in r_layout), device=self.device)
                dist.broadcast(buf, src=topo.leader_rank(r), group=self.groups.leaders)
                if r != topo.replica:
                    self.bytes_received += buf.numel() * 4
                    peers[r] = Published(r, step, _unflatten(buf.cpu(), r_layout), r_meta, buf.numel() * 4)
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
    out = dict(peers or {})
    box: list[Any] = [None]
    if topo.is_leader:
        box = [{r: (p.step, p.meta, [(k, list(v.shape), str(v.dtype).removeprefix("torch."))
                                     for k, v in p.state.items()]) for r, p in out.items()}]
    dist.broadcast_object_list(box, src=topo.leader_rank(), group=groups.replica)
    for r, (step, r_meta, r_layout) in sorted(box[0].items()):
        if topo.is_leader:
            buf = _flatten(out[r].state).to(device)
        else:
            buf = torch.empty(sum(_numel(s) for _, s, _ in r_layout), device=device)
        dist.broadcast(buf, src=topo.leader_rank(), group=groups.replica)
        if not topo.is_leader:
            if counter is not None:
                counter.bytes_received += buf.numel() * 4
            out[r] = Published(r, step, _unflatten(buf.cpu(), r_layout), r_meta, buf.numel() * 4)
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
