"""Distributed codistillation: one replica's loop on every rank, launched by torchrun.

Two launch modes share this loop:

* one world: ``torchrun --nproc-per-node=N*W -m codistill train CONFIG`` splits the world
  into N replicas of W ranks, each replica DDP over its own process group;
* one job per replica: ``codistill train CONFIG --replica R --num-replicas N --exchange DIR``
  (under torchrun for W > 1); replicas share only the exchange location.

The replica step, losses and teachers are the engine's (see :mod:`codistill.replica`), so
with W=1, the same seeds and ``codistill.sync`` on, both paths give the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import list_checkpoints, load_checkpoint, replica_dir, save_checkpoint, valid_steps
from .config import ConfigError, RunConfig, dump_config
from .engine import build_corpus, check_fresh_exchange, save_weights, val_batches
from .exchange import BackgroundExchange, MemoryExchange, Published, cpu_state, make_exchange, unwrap
from .exchange.collective import CollectiveExchange
from .metrics import MetricsWriter, RunDirError, evaluate_replicas
from .replica import Replica, build_replica, next_batch, replica_step
from .topology import Groups, Topology, env_world, make_groups, make_topology

log = logging.getLogger(__name__)


def _broadcast(obj: Any, topo: Topology, groups: Groups) -> Any:
    """The replica's first rank's ``obj`` on every rank of the replica."""
    if topo.workers == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=topo.leader_rank(), group=groups.replica)
    return box[0]


class ReplicaTrainer:
    """Trains this rank's replica; created on every rank."""

    def __init__(self, cfg: RunConfig, out_dir: str, topo: Topology, groups: Groups,
                 device: str) -> None:
        self.cfg, self.out_dir, self.topo, self.groups, self.device = cfg, out_dir, topo, groups, device
        self.corpus = build_corpus(cfg)
        spec = cfg.codistill.exchange
        self.collective = None
        if spec == "collective":
            self.collective = CollectiveExchange(topo, groups, device)
            exchange = MemoryExchange()  # teachers are loaded straight from the collective
        elif spec == "memory":
            if topo.world_size > 1 or not topo.one_world:
                raise ConfigError("codistill.exchange 'memory' cannot cross processes: give a "
                                  "directory, a URL or 'collective'")
            exchange = MemoryExchange(keep=cfg.codistill.keep)
        else:
            exchange = make_exchange(spec, keep=cfg.codistill.keep)
            if topo.is_leader:
                exchange = BackgroundExchange(exchange)
        self.exchange = exchange
        wrap = None
        if topo.workers > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [torch.device(device).index] if device.startswith("cuda") else None
            wrap = lambda m: DDP(m, device_ids=ids, process_group=groups.replica)  # noqa: E731
        self.rep: Replica = build_replica(cfg, topo.replica, self.corpus, exchange, cfg.batch_size,
                                          topo.worker, topo.workers, wrap,
                                          groups.replica if topo.workers > 1 else None)
        # dropout etc.: a distinct stream per (replica, worker), in both launch modes
        torch.manual_seed(cfg.seed * 100_003 + topo.replica * 1_009 + topo.worker)
        self.ckpt_root = os.path.join(out_dir, "checkpoints")
        self.writer: MetricsWriter | None = None
        self.batches = val_batches(self.corpus, cfg) if topo.is_leader else []
        self.sync_wait_s = 0.0

    # -- exchange ---------------------------------------------------------------------
    def exchange_step(self, done: int) -> None:
        cd = self.rep.codistiller
        if self.collective is not None:
            state = cpu_state(self.rep.model) if self.topo.is_leader else None
            meta = {"replica": self.topo.replica, "model": self.rep.spec}
            for published in self.collective.exchange(done, state, meta).values():
                cd.load_teacher(published)
            cd.bytes_published = self.collective.bytes_sent
            return
        # The first rank publishes, loads each peer's newest valid version (in sync mode: this
        # step's) and hands those teachers to the replica's other ranks.
        cd.exchange_now(done, self._wait_for_peers if self.cfg.codistill.sync else None)

    def _wait_for_peers(self, step: int) -> dict[int, int]:
        """Sync mode: block until every peer has published its version ``step``."""
        assert isinstance(self.exchange, BackgroundExchange)
        self.exchange.flush()
        t0 = time.perf_counter()
        waiting = set(self.rep.codistiller.peers)
        while waiting:
            waiting = {p for p in waiting if step not in self.exchange.versions(p)}
            if not waiting:
                break
            if time.perf_counter() - t0 > self.cfg.codistill.sync_timeout:
                raise TimeoutError(f"codistill.sync: replicas {sorted(waiting)} did not publish step "
                                   f"{step} within {self.cfg.codistill.sync_timeout:g}s")
            time.sleep(0.02)
        self.sync_wait_s += time.perf_counter() - t0
        return dict.fromkeys(self.rep.codistiller.peers, step)

    # -- checkpoints ------------------------------------------------------------------
    def save(self, done: int) -> None:
        rep, leader = self.rep, self.topo.is_leader
        cd = rep.codistiller
        worker_state = {"sampler": rep.sampler.state(), "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.startswith("cuda"):
            worker_state["cuda_rng"] = torch.cuda.get_rng_state()
        trainer_state = teachers = model_state = None
        if leader:
            if isinstance(self.exchange, BackgroundExchange):
                self.exchange.flush()  # the checkpoint's own published version is on disk
            model_state = cpu_state(rep.model)
            trainer_state = {
                "step": done, "optimizer": rep.optimizer.state_dict(),
                "scheduler": rep.scheduler.state_dict(),
                "teacher_versions": {str(p): v for p, v in cd.teacher_versions().items()},
                "bytes_published": cd.bytes_published, "bytes_read": cd.bytes_read,
                "fingerprint": self.fingerprint(),
            }
            teachers = {p: cpu_state(t.module) for p, t in cd.teachers.items() if t.version is not None}
        save_checkpoint(self.ckpt_root, self.topo.replica, done, self.topo.worker, self.topo.workers,
                        worker_state, model_state, trainer_state, teachers, self.groups.replica,
                        keep=self.cfg.checkpoint.keep)
        if leader:
            log.info("replica %d: checkpoint at step %d", self.topo.replica, done)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint's data position and weights depend on."""
        c = self.cfg
        return {"seed": c.seed, "replicas": c.replicas, "workers": self.topo.workers,
                "batch_size": c.batch_size, "data": dataclasses.asdict(c.data), "model": self.rep.spec}

    def _resume_step(self) -> int | None:
        """The checkpoint step to resume from, agreed inside the replica (and, in one-world
        mode, across replicas: the newest step every replica has a valid checkpoint of)."""
        topo, step = self.topo, None
        if topo.is_leader:
            valid = valid_steps(self.ckpt_root, topo.replica)
            if topo.one_world and topo.num_replicas > 1 and dist.is_initialized():
                every: list[Any] = [None] * topo.num_replicas
                dist.all_gather_object(every, valid, group=self.groups.leaders)
                common = set(every[0]).intersection(*every[1:])
                step = max(common) if common else None
            else:
                step = valid[-1] if valid else None
        return _broadcast(step, topo, self.groups)

    def resume(self) -> int:
        """Restore the latest valid checkpoint; return its step (0 if there is none)."""
        step = self._resume_step()
        if step is None:
            log.warning("replica %d: --resume found no valid checkpoint; starting at step 0",
                        self.topo.replica)
            return 0
        ck = load_checkpoint(self.ckpt_root, self.topo.replica, step, self.topo.worker)
        saved = ck.trainer_state.get("fingerprint", {})
        now = self.fingerprint()
        changed = sorted(k for k in now if k in saved and saved[k] != now[k])
        if changed:
            raise ConfigError(f"--resume: the checkpoint at step {step} was written with different "
                              f"{', '.join(changed)} ({', '.join(f'{k}={saved[k]}' for k in changed)}); "
                              "resume with the same settings or start a new run")
        rep, cd = self.rep, self.rep.codistiller
        unwrap(rep.model).load_state_dict(ck.model_state)
        rep.optimizer.load_state_dict(ck.trainer_state["optimizer"])
        rep.scheduler.load_state_dict(ck.trainer_state["scheduler"])
        rep.sampler.load_state(ck.worker_state["sampler"])
        for key, version in ck.trainer_state["teacher_versions"].items():
            peer = int(key)
            if version is not None and peer in ck.teacher_states:
                cd.load_teacher(Published(peer, version, ck.teacher_states[peer], {}, 0))
        # Counters and RNG last: loading teachers above must not change them.
        cd.bytes_published = ck.trainer_state["bytes_published"]
        cd.bytes_read = ck.trainer_state["bytes_read"]
        torch.set_rng_state(ck.worker_state["torch_rng"])
        if "cuda_rng" in ck.worker_state and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(ck.worker_state["cuda_rng"])
        if (self.topo.is_leader and self.collective is None and cd.exchange_due(step)
                and step not in self.exchange.versions(self.topo.replica)):
            cd.publish(step)  # killed before the background write of this version landed
        log.info("replica %d worker %d: resumed at step %d", self.topo.replica, self.topo.worker, step)
        return step

    # -- metrics ----------------------------------------------------------------------
    def evaluate(self, done: int) -> dict[str, Any]:
        model = unwrap(self.rep.model)
        res = evaluate_replicas([model], self.batches)
        loss = res["loss"][0]
        assert self.writer is not None
        self.writer.write({"step": done, "kind": "eval", "replica": self.topo.replica, "loss": loss,
                           "bpb": self.corpus.bits_per_byte(loss), "acc": res["acc"][0]})
        return res

    def train(self, resume: bool = False, stop_at: int | None = None, progress: bool = True,
              overwrite: bool = False) -> dict[str, Any]:
        cfg, topo = self.cfg, self.topo
        start = self.resume() if resume else 0
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        leader = topo.is_leader
        if leader:
            os.makedirs(self.out_dir, exist_ok=True)
            if not resume and self.collective is None:
                check_fresh_exchange(self.exchange, topo.replica, overwrite)
            self.writer = MetricsWriter(self.out_dir, f"metrics-replica{topo.replica}.jsonl",
                                        tb_subdir=f"replica-{topo.replica}", overwrite=overwrite,
                                        resume_step=start if resume else None)
            old = list_checkpoints(self.ckpt_root, topo.replica)
            if not resume and old:
                if not overwrite:
                    raise RunDirError(f"{self.ckpt_root} holds checkpoints of replica {topo.replica}: "
                                      "pass --resume to continue or --overwrite to start afresh")
                shutil.rmtree(replica_dir(self.ckpt_root, topo.replica))
            if topo.replica == 0:
                dump_config(cfg, os.path.join(self.out_dir, "config.yaml"))
            if start == 0:
                self.evaluate(0)
        cd = self.rep.codistiller
        acc: dict[str, float] = defaultdict(float)
        nacc = 0
        t_start = time.perf_counter()
        bar = tqdm(range(start, end), desc=f"{cfg.name} replica {topo.replica}", initial=start,
                   total=end, disable=not (progress and leader and topo.replica == 0),
                   dynamic_ncols=True)
        for step in bar:
            out = replica_step(self.rep, next_batch(self.rep, self.corpus, self.device), step,
                               cfg.optimizer.grad_clip)
            done = step + 1
            if cd.exchange_due(done):
                t0 = time.perf_counter()
                self.exchange_step(done)
                out["exchange_time"] = time.perf_counter() - t0
            for k, v in out.items():
                acc[k] += v
            nacc += 1
            ckpt_due = cfg.checkpoint.every and done % cfg.checkpoint.every == 0
            if ckpt_due or done == end:
                self.save(done)
            if leader and (done % cfg.log_every == 0 or done == end):
                stale = cd.staleness(done)
                wait = getattr(self.exchange, "wait_seconds", 0.0)
                row = {"step": done, "kind": "train", "replica": topo.replica,
                       **{k: v / nacc for k, v in acc.items()},
                       "lr": self.rep.scheduler.get_last_lr()[0],
                       "staleness": {str(p): s for p, s in stale.items()},
                       "staleness_max": max((s for s in stale.values() if s is not None), default=None),
                       "teacher_versions": {str(p): v for p, v in cd.teacher_versions().items()},
                       "bytes_published": cd.bytes_published, "bytes_read": cd.bytes_read,
                       "publish_wait_s": wait, "sync_wait_s": self.sync_wait_s}
                assert self.writer is not None
                self.writer.write(row)
                bar.set_postfix(loss=f"{acc['task_loss'] / nacc:.3f}")
                acc.clear()
                nacc = 0
            if leader and (done % cfg.eval.every == 0 or done == cfg.steps):
                self.evaluate(done)
        bar.close()
        wall = time.perf_counter() - t_start
        self.exchange.close()
        summary: dict[str, Any] = {"replica": topo.replica, "worker": topo.worker, "start": start,
                                   "end": end, "wall_time_s": wall,
                                   "steps_per_s": (end - start) / wall if wall > 0 else None,
                                   "bytes_published": cd.bytes_published, "bytes_read": cd.bytes_read}
        if leader:
            assert self.writer is not None
            self.writer.close()
            if end == cfg.steps:
                summary["weights"] = save_weights(self.rep, self.out_dir)
            with open(os.path.join(self.out_dir, f"summary-replica{topo.replica}.json"), "w",
                      encoding="utf-8") as f:
                json.dump(summary, f, indent=1)
        return summary


def _device(cfg: RunConfig, local_rank: int) -> str:
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return cfg.device


def run_distributed(
    cfg: RunConfig,
    out_dir: str,
    replica: int | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Entry point on every rank (reads torchrun's environment; works without it as W=1)."""
    rank, world, local_rank = env_world()
    topo = make_topology(rank, world, cfg.replicas, replica)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    device = _device(cfg, local_rank)
    own_pg = False
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        dist.init_process_group(backend)
        own_pg = True
    try:
        groups = make_groups(topo)
        if rank == 0:
            where = "" if topo.one_world else f" (replica {topo.replica} of {cfg.replicas})"
            log.info("world %d: %d replica(s) x %d worker(s)%s", world,
                     topo.num_replicas if topo.one_world else 1, topo.workers, where)
        trainer = ReplicaTrainer(cfg, out_dir, topo, groups, device)
        return trainer.train(resume=resume, stop_at=stop_at, progress=progress, overwrite=overwrite)
    finally:
        if own_pg:
            dist.destroy_process_group()
