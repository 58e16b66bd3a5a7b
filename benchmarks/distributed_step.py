"""Wall time per step: 2 replicas × 2 workers (codistillation) vs 1 replica × 4 workers (DDP).

Both runs use the same model, per-worker batch and step count on gloo, launched by torchrun
on this machine; the pair is repeated and the medians and their ratio printed. Also prints
the bytes that cross replicas per step (exchange) against a sync-SGD ring all-reduce of the
gradient over all 4 workers.

    .venv/bin/python benchmarks/distributed_step.py [--repeats 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

CONFIG = """
name: bench
steps: {steps}
batch_size: 32
log_every: 10
threads: 1
model: {{name: lstm, embed_dim: 64, hidden_dim: 256}}
data: {{seq_len: 64}}
optimizer: {{name: adam, lr: 0.003}}
codistill: {{burn_in: 0, exchange_every: {k}, exchange: {exchange}}}
checkpoint: {{every: 0}}
eval: {{every: 100000, max_batches: 1}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(replicas: int, workers: int, steps: int, k: int, root: str) -> dict:
    run = tempfile.mkdtemp(dir=root)
    cfg = os.path.join(run, "config.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(steps=steps, k=k, exchange=os.path.join(run, "exchange")))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, f"--nproc-per-node={replicas * workers}", f"--master-port={free_port()}",
           "-m", "codistill", "train", cfg, "--out", run, "--no-progress",
           "--set", f"replicas={replicas}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    summaries = [json.load(open(os.path.join(run, f"summary-replica{r}.json"))) for r in range(replicas)]
    rows = [json.loads(line) for r in range(replicas)
            for line in open(os.path.join(run, f"metrics-replica{r}.jsonl"))]
    step_times = [r["step_time"] for r in rows if r["kind"] == "train"]
    return {
        "s_per_step": max(s["wall_time_s"] for s in summaries) / steps,
        "compute_s_per_step": statistics.median(step_times),
        "bytes_published": sum(n for s in summaries for n in s["bytes_published"].values()),
        "bytes_read": sum(n for s in summaries for n in s["bytes_read"].values()),
        "param_bytes": os.path.getsize(os.path.join(run, "replica-0", "model.safetensors")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--exchange-every", type=int, default=50)
    a = p.parse_args()
    codist, ddp = [], []
    with tempfile.TemporaryDirectory() as root:
        for i in range(a.repeats):  # interleaved, so drift in machine load hits both
            codist.append(launch(2, 2, a.steps, a.exchange_every, root))
            ddp.append(launch(1, 4, a.steps, a.exchange_every, root))
            print(f"repeat {i + 1}: 2x2 {codist[-1]['s_per_step'] * 1e3:.1f} ms/step, "
                  f"1x4 {ddp[-1]['s_per_step'] * 1e3:.1f} ms/step", flush=True)
    c = statistics.median(r["s_per_step"] for r in codist)
    d = statistics.median(r["s_per_step"] for r in ddp)
    print(f"\nwall time per step (median of {a.repeats}): 2x2 codistill {c * 1e3:.1f} ms, "
          f"1x4 DDP {d * 1e3:.1f} ms, ratio 2x2/1x4 = {c / d:.2f}")
    cc = statistics.median(r["compute_s_per_step"] for r in codist)
    dc = statistics.median(r["compute_s_per_step"] for r in ddp)
    print(f"replica step (forward+teacher+backward+all-reduce) median: {cc * 1e3:.1f} ms vs "
          f"{dc * 1e3:.1f} ms, ratio {cc / dc:.2f}")
    r = codist[0]
    p_bytes = r["param_bytes"]
    cross = (r["bytes_published"] + r["bytes_read"]) / a.steps
    world = 4
    allreduce = 2 * (world - 1) * p_bytes  # ring all-reduce, summed over the 4 workers
    print(f"model: {p_bytes / 1e6:.2f} MB of weights; K={a.exchange_every}")
    print(f"bytes crossing replicas per step (2 replicas, writes + reads): {cross / 1e3:.1f} kB")
    print(f"sync-SGD ring all-reduce over 4 workers per step: {allreduce / 1e6:.2f} MB "
          f"(ratio all-reduce / exchange = {allreduce / cross:.0f}x)")


if __name__ == "__main__":
    main()
