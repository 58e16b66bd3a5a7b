"""N replicas trained round-robin in one process: the paper's Algorithm 1.

Each step, every replica takes one optimizer step on its own shard (W workers simulated by
a W×b batch); at exchange steps every replica publishes, then every replica refreshes its
teachers, so all replicas see their peers' weights from the same step. N=1 is the sync-SGD
baseline; α=0 with N>1 trains independent replicas, still evaluated as an ensemble.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .config import RunConfig, dump_config
from .data import TextCorpus, build_text_corpus
from .exchange import Exchange, cpu_state, make_exchange
from .metrics import MetricsWriter, RunDirError, evaluate_replicas
from .replica import Replica, build_replica, next_batch, replica_step

log = logging.getLogger(__name__)


def build_corpus(cfg: RunConfig) -> TextCorpus:
    d = cfg.data
    return build_text_corpus(d.level, d.seq_len, d.val_fraction, d.vocab_size, d.path, d.max_chars)


def val_batches(corpus: TextCorpus, cfg: RunConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation batches (all of the split unless ``eval.max_batches``)."""
    bs = cfg.eval.batch_size
    val = corpus.val
    if cfg.eval.max_batches and cfg.eval.max_batches * bs < val.shape[0]:
        # An evenly spaced subset, so a partial evaluation still spans every held-out block.
        val = val[torch.linspace(0, val.shape[0] - 1, cfg.eval.max_batches * bs).long()]
    out = []
    for i in range(0, val.shape[0], bs):
        seqs = val[i : i + bs].to(cfg.device)
        out.append((seqs[:, :-1], seqs[:, 1:]))
    return out


def evaluate(
    replicas: list[Replica], batches: list, corpus: TextCorpus, step: int, writer: MetricsWriter
) -> dict[str, Any]:
    """Evaluate every replica, their ensemble and churn; write the rows; return the result."""
    res = evaluate_replicas([r.model for r in replicas], batches)
    for r, loss, acc in zip(replicas, res["loss"], res["acc"]):
        writer.write({"step": step, "kind": "eval", "replica": r.index, "loss": loss,
                      "bpb": corpus.bits_per_byte(loss), "acc": acc})
    if len(replicas) > 1:
        writer.write({"step": step, "kind": "ensemble", "replica": "ensemble",
                      "loss": res["ensemble_loss"], "bpb": corpus.bits_per_byte(res["ensemble_loss"]),
                      "acc": res["ensemble_acc"]})
        writer.write({"step": step, "kind": "churn", "replica": "pairs",
                      "churn_prob": res["churn_prob"], "churn_top1": res["churn_top1"]})
    return res


def check_fresh_exchange(exchange: Exchange, replica: int, overwrite: bool) -> None:
    """A replica starting afresh must not find versions of its own from an earlier run in
    the exchange (its peers would distil from them); ``overwrite`` deletes them."""
    old = exchange.versions(replica)
    if not old:
        return
    if not overwrite:
        raise RunDirError(f"the exchange already holds versions {old} of replica {replica} from an "
                          "earlier run: pass --resume to continue it, --overwrite to delete them, "
                          "or use another exchange location")
    log.warning("deleting versions %s of replica %d from the exchange (--overwrite)", old, replica)
    exchange.clear(replica)


def save_weights(rep: Replica, out_dir: str) -> str:
    folder = os.path.join(out_dir, f"replica-{rep.index}")
    os.makedirs(folder, exist_ok=True)
    state = cpu_state(rep.model)  # separate copies: tied weights would share memory
    path = os.path.join(folder, "model.safetensors")
    save_file(state, path, metadata={"model": json.dumps(rep.spec)})
    return path


def run(cfg: RunConfig, out_dir: str, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg.replicas`` replicas round-robin; write metrics, weights and the config.

    Returns a summary with the final evaluation.
    """
    os.makedirs(out_dir, exist_ok=True)
    # In one process every exchange is equivalent; a directory is still written if given.
    spec = "memory" if cfg.codistill.exchange == "collective" else cfg.codistill.exchange
    exchange = make_exchange(spec, keep=cfg.codistill.keep)
    for r in range(cfg.replicas):
        check_fresh_exchange(exchange, r, overwrite)
    writer = MetricsWriter(out_dir, overwrite=overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dump_config(cfg, os.path.join(out_dir, "config.yaml"))
    corpus = build_corpus(cfg)
    batch = cfg.workers * cfg.batch_size
    replicas = [build_replica(cfg, r, corpus, exchange, batch) for r in range(cfg.replicas)]
    batches = val_batches(corpus, cfg)
    log.info("run %s: N=%d W=%d b=%d K=%d B=%d alpha=%g, %d steps -> %s", cfg.name, cfg.replicas,
             cfg.workers, cfg.batch_size, cfg.codistill.exchange_every, cfg.codistill.burn_in,
             cfg.codistill.alpha, cfg.steps, out_dir)

    acc: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    nacc = 0
    final = evaluate(replicas, batches, corpus, 0, writer)
    bar = tqdm(range(cfg.steps), desc=cfg.name, disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        for rep in replicas:
            out = replica_step(rep, next_batch(rep, corpus, cfg.device), step,
                               cfg.optimizer.grad_clip)
            for k, v in out.items():
                acc[rep.index][k] += v
        nacc += 1
        done = step + 1
        for rep in replicas:
            rep.codistiller.publish_if_due(done)
        for rep in replicas:
            rep.codistiller.refresh_if_due(done)
        if done % cfg.log_every == 0 or done == cfg.steps:
            for rep in replicas:
                cd = rep.codistiller
                stale = cd.staleness(done)
                row = {"step": done, "kind": "train", "replica": rep.index,
                       **{k: v / nacc for k, v in acc[rep.index].items()},
                       "lr": rep.scheduler.get_last_lr()[0],
                       "staleness": {str(p): s for p, s in stale.items()},
                       "staleness_max": max((s for s in stale.values() if s is not None),
                                            default=None),
                       "bytes_published": cd.bytes_published, "bytes_read": cd.bytes_read}
                writer.write(row)
            bar.set_postfix(loss=f"{acc[0]['task_loss'] / nacc:.3f}")
            acc.clear()
            nacc = 0
        if done % cfg.eval.every == 0 or done == cfg.steps:
            final = evaluate(replicas, batches, corpus, done, writer)
            bar.set_postfix(val=" ".join(f"{x:.3f}" for x in final["loss"]))
    bar.close()
    weights = [save_weights(rep, out_dir) for rep in replicas]
    writer.close()
    exchange.close()
    summary = {"name": cfg.name, "steps": cfg.steps, "replicas": cfg.replicas,
               "wall_time_s": time.perf_counter() - start, "final": final, "weights": weights}
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary
