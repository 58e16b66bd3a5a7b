"""Run ``codistill train`` on every rank, then save what each rank ended up with.

Launched by tests/test_distributed.py as::

    torchrun --nproc-per-node=N*W tests/dist_probe.py CONFIG --out RUN_DIR [train options]

The arguments are those of ``codistill train``; the real CLI runs them unchanged. Afterwards
every rank writes ``RUN_DIR/probe/rank-{RANK}.safetensors``: its replica's model weights
(``model.NAME``) and its teachers' weights (``teacher-PEER.NAME``), with the rank's replica,
worker and teacher versions as JSON in the file's metadata. (The run's own checkpoints and
final weights are written by a replica's first rank only, so they cannot show that the
ranks of one replica agree.)

Fault injection for the tests, through the environment:

* ``CODISTILL_PROBE_SLOW_PUBLISH=STEP:SECONDS[:REPLICA]``: writing a replica's version STEP
  into the exchange directory takes SECONDS longer (a slow shared filesystem; training goes
  on, as the write runs on the background publisher's thread).
* ``CODISTILL_PROBE_SLOW_WORKERS=STEP:SECONDS[:REPLICA]``: the ranks other than a replica's
  first reach the exchange of STEP SECONDS late (a slow worker).

* ``CODISTILL_PROBE_GATES=R:STEP:PEER:PEER_STEP,...``: the ranks of replica R wait before
  their exchange of STEP until PEER has published a version >= PEER_STEP in the exchange
  directory (at most 60 s); this pins down how far one replica runs ahead of another.

Without REPLICA the fault hits every replica.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

from codistill import cli
from codistill import trainer as trainer_mod
from codistill.exchange.directory import DirectoryExchange


def _delay(var: str) -> tuple[int, float, int | None] | None:
    """``STEP:SECONDS[:REPLICA]`` from the environment."""
    raw = os.environ.get(var)
    if not raw:
        return None
    step, seconds, *replica = raw.split(":")
    return int(step), float(seconds), (int(replica[0]) if replica else None)


def _install_faults() -> None:
    slow_publish = _delay("CODISTILL_PROBE_SLOW_PUBLISH")
    if slow_publish is not None:
        orig_publish = DirectoryExchange.publish

        def publish(self, replica, step, state, meta):  # type: ignore[no-untyped-def]
            if step == slow_publish[0] and slow_publish[2] in (None, replica):
                time.sleep(slow_publish[1])
            return orig_publish(self, replica, step, state, meta)

        DirectoryExchange.publish = publish  # type: ignore[method-assign]
    slow_workers = _delay("CODISTILL_PROBE_SLOW_WORKERS")
    gates = [tuple(int(x) for x in g.split(":"))
             for g in os.environ.get("CODISTILL_PROBE_GATES", "").split(",") if g]
    orig_exchange_step = trainer_mod.ReplicaTrainer.exchange_step

    def exchange_step(self, done):  # type: ignore[no-untyped-def]
        for replica, step, peer, peer_step in gates:
            if replica == self.topo.replica and step == done:
                ex = DirectoryExchange(self.cfg.codistill.exchange)
                deadline = time.monotonic() + 60
                while (time.monotonic() < deadline
                       and not any(v >= peer_step for v in ex.versions(peer))):
                    time.sleep(0.01)
        if (slow_workers is not None and not self.topo.is_leader and done == slow_workers[0]
                and slow_workers[2] in (None, self.topo.replica)):
            time.sleep(slow_workers[1])
        return orig_exchange_step(self, done)

    trainer_mod.ReplicaTrainer.exchange_step = exchange_step  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    captured: dict[str, trainer_mod.ReplicaTrainer] = {}
    orig_train = trainer_mod.ReplicaTrainer.train

    def train(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        captured["trainer"] = self
        return orig_train(self, *args, **kwargs)

    trainer_mod.ReplicaTrainer.train = train  # type: ignore[method-assign]
    _install_faults()
    rc = cli.main(["train", *argv])
    if rc:
        return rc
    tr = captured["trainer"]
    model = getattr(tr.rep.model, "module", tr.rep.model)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        tensors[f"model.{name}"] = value.detach().cpu().contiguous()
    versions = {}
    for peer, teacher in tr.rep.codistiller.teachers.items():
        versions[str(peer)] = teacher.version
        for name, value in teacher.module.state_dict().items():
            tensors[f"teacher-{peer}.{name}"] = value.detach().cpu().contiguous()
    folder = os.path.join(tr.out_dir, "probe")
    os.makedirs(folder, exist_ok=True)
    info = {"rank": tr.topo.rank, "replica": tr.topo.replica, "worker": tr.topo.worker,
            "teacher_versions": versions}
    save_file(tensors, os.path.join(folder, f"rank-{tr.topo.rank}.safetensors"),
              metadata={"probe": json.dumps(info)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
