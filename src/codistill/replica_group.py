"""A replica's ranks: the first one chooses, then shares or scatters to the others."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from .exchange import Published
from .exchange.collective import share_teachers
from .teachers import TeacherSet


class ReplicaGroup:
    """The ranks that train one replica (its process group under DDP or FSDP2). Its first
    rank ``leads``: it publishes the replica's weights and picks and loads the teachers'
    versions; the other ranks then receive the new teachers whole (:meth:`share`) or, for
    sharded teachers, each its shards of them (:meth:`scatter`). Without a process group,
    or with one rank, the group is ``solo`` and the rank acts on its own."""

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    @property
    def solo(self) -> bool:
        """One rank: nothing to share."""
        pg = self.process_group
        return pg is None or not dist.is_initialized() or dist.get_world_size(pg) == 1

    @property
    def leads(self) -> bool:
        """This rank is the replica's first (or the group is solo)."""
        return self.solo or dist.get_rank(self.process_group) == 0

    @property
    def src(self) -> int:
        """The global rank of the replica's first rank."""
        return dist.get_global_rank(self.process_group, 0)

    def share(self, changed: dict[int, Published] | None, teachers: TeacherSet, device: str) -> None:
        """Every rank: the first rank's ``changed`` teachers (whole weights) are loaded on
        the others."""
        for published in share_teachers(changed, self.leads, self.src, self.process_group, device).values():
            if not self.leads:
                teachers.load(published)

    def scatter(self, chosen: dict[int, Published] | None, teachers: TeacherSet) -> None:
        """Every rank: load the versions the first rank ``chose`` into the sharded teachers,
        one tensor at a time (each rank keeps its shards)."""
        chosen = chosen or {}
        box: list[Any] = [{p: (v.step, v.meta, v.ident) for p, v in chosen.items()}]
        dist.broadcast_object_list(box, src=self.src, group=self.process_group)
        for peer, (step, meta, ident) in sorted(box[0].items()):
            published = chosen.get(peer) or Published(peer, step, {}, meta, ident=ident)
            teachers.build(peer, meta).load(published, self.src, self.process_group)
            if self.leads:
                teachers.bytes_read += published.nbytes
