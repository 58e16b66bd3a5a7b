"""Run ``codistill train`` on every rank, then save what each rank ended up with.

Launched by tests/test_distributed.py as::

    torchrun --nproc-per-node=N*W tests/dist_probe.py CONFIG --out RUN_DIR [train options]

The arguments are those of ``codistill train``; the real CLI runs them unchanged. Afterwards
every rank writes ``RUN_DIR/probe/rank-{RANK}.safetensors``: its replica's model weights
(``model.NAME``) and its teachers' weights (``teacher-PEER.NAME``), with the rank's replica,
worker, whether it leads its replica, teacher versions and exchange (type, byte counters) as
JSON in the file's metadata. Sharded (FSDP2) weights are gathered first, so
every rank saves whole tensors. (The run's own checkpoints and final weights are written by a
replica's first rank only, so they cannot show that the ranks of one replica agree.)

Hooks: ``codistill.loop.Loop.run`` is wrapped to capture the rank's loop (its one replica),
and ``Loop.publish_and_refresh`` (called on every rank after every step) to inject the faults
below at exchange steps.

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
from codistill.exchange.directory import DirectoryExchange
from codistill.loop import Loop
from codistill.modules import unwrap


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
    orig_publish_and_refresh = Loop.publish_and_refresh

    def publish_and_refresh(self, done):  # type: ignore[no-untyped-def]
        # It runs on every rank after every step; faults hit exchange steps only.
        (rep,) = self.replicas  # one replica per rank under torchrun
        if rep.codistiller.exchange_due(done):
            for replica, step, peer, peer_step in gates:
                if replica == rep.index and step == done:
                    ex = DirectoryExchange(self.cfg.codistill.exchange)
                    deadline = time.monotonic() + 60
                    while (time.monotonic() < deadline
                           and not any(v >= peer_step for v in ex.versions(peer))):
                        time.sleep(0.01)
            if (slow_workers is not None and not self.leader and done == slow_workers[0]
                    and slow_workers[2] in (None, rep.index)):
                time.sleep(slow_workers[1])
        return orig_publish_and_refresh(self, done)

    Loop.publish_and_refresh = publish_and_refresh  # type: ignore[method-assign]


def _whole(value: torch.Tensor) -> torch.Tensor:
    """A weight as one host tensor; a sharded (FSDP2) one is gathered from the replica's ranks,
    which all reach this in the same order."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach().cpu().contiguous()


def _out_dir(argv: list[str]) -> str:
    return argv[argv.index("--out") + 1]


def _save(loop: Loop, out: str) -> None:
    """This rank's weights, teachers and counters (while the process group still exists: a
    sharded weight is gathered from the replica's ranks)."""
    (rep,) = loop.replicas
    tensors: dict[str, torch.Tensor] = {}
    for name, value in unwrap(rep.model).state_dict().items():
        tensors[f"model.{name}"] = _whole(value)
    versions = {}
    for peer, teacher in rep.codistiller.teachers.items():
        versions[str(peer)] = teacher.version
        for name, value in teacher.module.state_dict().items():
            tensors[f"teacher-{peer}.{name}"] = _whole(value)
    folder = os.path.join(out, "probe")
    os.makedirs(folder, exist_ok=True)
    rank = int(os.environ["RANK"])
    ex = rep.codistiller.exchange
    info = {"rank": rank, "replica": rep.index, "worker": loop.checkpointers[0].worker,
            "leader": loop.leader, "teacher_versions": versions,
            "exchange": {"type": type(ex).__name__, "durable": ex.durable},
            "bytes_published": rep.codistiller.stats().bytes_published}
    save_file(tensors, os.path.join(folder, f"rank-{rank}.safetensors"),
              metadata={"probe": json.dumps(info)})


def main(argv: list[str]) -> int:
    orig_run = Loop.run

    def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = orig_run(self, *args, **kwargs)
        _save(self, _out_dir(argv))
        return result

    Loop.run = run  # type: ignore[method-assign]
    _install_faults()
    return cli.main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
