"""The plug-in inside a user's own DDP loop: 2 replicas x 2 workers under torchrun.

    torchrun --nproc-per-node=4 tests/plugin_ddp_probe.py EXCHANGE_DIR OUT_DIR [--no-group] [--sync]

``--sync``: lock-step mode (``LockStep``): every exchange loads exactly the peers' versions
of that step.

Each rank saves its model and teachers to OUT_DIR/rank-R.safetensors (versions in metadata).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from codistill import AlphaSchedule, Codistiller, DirectoryExchange, LockStep, task_loss


def main(exchange_dir: str, out: str, use_group: bool, sync: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    replica, w = rank // 2, 2
    groups = [dist.new_group([r * w, r * w + 1]) for r in range(world // w)]
    torch.manual_seed(replica)  # same init inside a replica
    model = DDP(torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)),
                process_group=groups[replica])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cd = Codistiller(model, DirectoryExchange(exchange_dir), replica=replica,
                     num_replicas=world // w, exchange_every=3, alpha=AlphaSchedule(burn_in=3),
                     process_group=groups[replica] if use_group else None,
                     wait=LockStep(60.0) if sync else None)
    g = torch.Generator().manual_seed(rank)
    for step in range(12):
        x = torch.randint(0, 16, (8, 4), generator=g)
        logits = model(x)
        loss = task_loss(logits, (x + 1) % 16) + cd.distill_loss(x, logits, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cd.after_step(step + 1)
        if not sync:
            dist.barrier()  # keeps the two replicas within a step of each other for the test
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.module.state_dict().items()}
    for p, t in cd.teachers.items():
        tensors.update({f"teacher-{p}.{k}": v.detach().clone() for k, v in t.module.state_dict().items()})
    os.makedirs(out, exist_ok=True)
    meta = {"replica": replica, "versions": cd.teacher_versions(), "worker": rank % w,
            "bytes_published": cd.stats().bytes_published}
    save_file(tensors, os.path.join(out, f"rank-{rank}.safetensors"), {"probe": json.dumps(meta)})
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--no-group" not in sys.argv, "--sync" in sys.argv)
