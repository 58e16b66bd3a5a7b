"""How a replica's model is laid out over its ranks, and moving whole weights in and out.

A replica is one model trained by W ranks: whole on every rank (``ddp``, DistributedDataParallel)
or sharded across them (``fsdp``, FSDP2's ``fully_shard``). The exchange and the final weights
hold whole models; :func:`full_state` and :func:`load_full_state` convert one tensor at a
time, so no rank's device ever holds more than its shard plus one whole tensor. With W = 1
and no process group everything here is a plain ``state_dict`` copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .exchange.base import HostBuffers
from .exchange.compression import Encoder
from .modules import unwrap

LAYOUTS = ("ddp", "fsdp")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # a run's precision (or teacher_dtype) -> dtype


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """True if ``module`` is sharded across ranks (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def replica_mesh(group: Any, device: str) -> Any:
    """A one-dimensional device mesh over the ranks of ``group`` (a replica)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, torch.device(device).type)


def shard_model(module: nn.Module, mesh: Any) -> nn.Module:
    """Shard ``module`` across ``mesh`` with FSDP2: each block of every ``nn.ModuleList``
    (transformer layers) is its own unit, then the rest; every unit is gathered only while
    it runs (also the root: a teacher's forward must not leave it whole)."""
    from torch.distributed.fsdp import fully_shard

    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                if any(True for _ in block.parameters()):
                    fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module


def layout(parallel: str, group: Any, device: str) -> Callable[[nn.Module], nn.Module] | None:
    """The function that lays a freshly built model out over the replica's ``group``: DDP
    (None when the replica has one rank), or FSDP2 (even with one rank, so its numbers are
    those of a larger sharded replica)."""
    if parallel not in LAYOUTS:
        raise ValueError(f"parallel must be one of {list(LAYOUTS)}, got {parallel!r}")
    if group is None or not dist.is_initialized():
        if parallel == "fsdp":
            raise ValueError("parallel: fsdp shards a replica across torchrun ranks; the one-process "
                             "engine trains whole models (use parallel: ddp, or launch with torchrun)")
        return None
    if parallel == "fsdp":
        mesh = replica_mesh(group, device)
        return lambda m: shard_model(m, mesh)
    if dist.get_world_size(group) == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return lambda m: DDP(m, device_ids=ids, process_group=group)


def model_state(module: nn.Module) -> dict[str, Any]:
    """``module``'s state with clean names (no DDP / FSDP prefixes), sharded as it is."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)


def full_state(module: nn.Module, keep: bool = True, host: HostBuffers | None = None,
               copy: bool = True, encode: Encoder | None = None) -> dict[str, torch.Tensor] | None:
    """``module``'s whole weights: a contiguous CPU copy; into reused ``host`` buffers (a
    publish in flight); or, with ``copy=False``, the module's own tensors (for a caller that
    reads them at once). A sharded module gathers one tensor at a time, and every rank of its
    replica must call this together; only where ``keep`` is the result kept (else None).
    ``encode``: each whole tensor is replaced by the tensors it gives, on its device, before
    any copy (a compressed version, :mod:`codistill.exchange.compression`)."""

    sharded, cls = is_sharded(module), _dtensor()
    items = model_state(module).items() if sharded else unwrap(module).state_dict().items()
    out: dict[str, torch.Tensor] = {}
    for name, value in items:
        whole = value.full_tensor() if isinstance(value, cls) else value
        if not keep:
            continue
        for key, tensor in (encode(name, whole) if encode is not None else {name: whole}).items():
            if host is not None:
                host.put(key, tensor)
            else:
                out[key] = tensor.detach().to("cpu", copy=True).contiguous() if copy else tensor.detach()
    if not keep:
        return None
    return host.state() if host is not None else out


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor] | None, src: int | None = None,
                    group: Any = None) -> None:
    """Load whole weights into ``module``. A sharded module: every rank of its replica calls
    this together, ``state`` given on the first (``src``, a global rank, in ``group``) and
    None elsewhere; each tensor is scattered, so a rank keeps only its shard."""
    if not is_sharded(module):
        if state is None:
            raise ValueError("load_full_state: a whole module needs the weights on this rank")
        module.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    from torch.distributed.tensor import distribute_tensor

    module.reshard()  # type: ignore[operator]  # FSDPModule: the sharded parameters are the registered ones
    cls, sharded = _dtensor(), {}
    for name, value in model_state(module).items():
        local = value.to_local() if isinstance(value, cls) else value
        if state is not None:
            if name not in state:
                raise ValueError(f"missing weights for {name!r}")
            whole = state[name].to(local.device, local.dtype)
        else:
            whole = torch.empty(value.shape, dtype=local.dtype, device=local.device)
        if isinstance(value, cls):
            sharded[name] = distribute_tensor(whole, value.device_mesh, value.placements, src_data_rank=0)
        else:  # buffers stay whole on every rank
            if group is not None and src is not None:
                dist.broadcast(whole, src=src, group=group)
            sharded[name] = whole
    if state is not None and (extra := sorted(set(state) - set(sharded))):
        raise ValueError(f"unexpected weights {extra[:3]}")
    set_model_state_dict(module, sharded)


def autocast(device: str, precision: str) -> Any:
    """The student's forward context: bf16 autocast, or nothing for fp32."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])
