"""Scaling on this machine: replicas × workers per replica, DDP and FSDP2, for each task.

For each task's model (the byte LSTM LM, the image CNN, the click model) and each layout
(`parallel: ddp | fsdp`), torchrun trains 1×1, 1×2, 2×1 and 2×2 (replicas × workers) with the
same per-worker batch, K and steps (a directory exchange, codistillation from step 0). It
prints examples per second and its ratio to 1×1 (the medians of ``--repeats`` interleaved
launches), and the bytes that cross replicas per step (published + read) against what a
sync-SGD ring all-reduce of the gradient over the same number of workers sends.

On 2 cores, 4 processes share 2 cores: the ratios say what codistillation and sharding cost
and save here, not what they give on a cluster.

    .venv/bin/python benchmarks/scaling.py [--tasks lm image click] [--repeats 2] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from distributed_step import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"lm": "configs/demo.yaml", "image": "configs/image.yaml", "click": "configs/click.yaml"}
SHAPES = [(1, 1), (1, 2), (2, 1), (2, 2)]


def launch(task: str, parallel: str, replicas: int, workers: int, steps: int, k: int, root: str) -> dict:
    run = tempfile.mkdtemp(dir=root)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    sets = {"steps": steps, "replicas": replicas, "threads": 1, "log_every": 10, "parallel": parallel,
            "eval.every": 10**6, "eval.max_batches": 1, "checkpoint.every": 0, "codistill.burn_in": 0,
            "codistill.exchange_every": k, "codistill.exchange": os.path.join(run, "exchange")}
    cmd = [torchrun, f"--nproc-per-node={replicas * workers}", f"--master-port={free_port()}",
           "-m", "codistill", "train", os.path.join(ROOT, CONFIGS[task]), "--out", run, "--no-progress"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if job.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{job.stderr[-3000:]}")
    summaries = [json.load(open(os.path.join(run, f"summary-replica{r}.json"))) for r in range(replicas)]
    wall = max(s["wall_time_s"] for s in summaries)
    return {
        "s_per_step": wall / steps,
        "crossing": sum(n for s in summaries for k_ in ("bytes_published", "bytes_read")
                        for n in s[k_].values()) / steps,
        "param_bytes": os.path.getsize(os.path.join(run, "replica-0", "model.safetensors")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--layouts", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--exchange-every", type=int, default=50)
    a = p.parse_args()
    print(f"{a.steps} steps, K={a.exchange_every}, medians of {a.repeats}; throughput = examples/s "
          "(replicas x workers x batch per step), ratio to 1x1 of the same layout")
    with tempfile.TemporaryDirectory() as root:
        for task in a.tasks:
            for layout in a.layouts:
                runs: dict[tuple[int, int], list[dict]] = {shape: [] for shape in SHAPES}
                for _ in range(a.repeats):  # interleaved: drift in machine load hits every shape
                    for r, w in SHAPES:
                        runs[(r, w)].append(launch(task, layout, r, w, a.steps, a.exchange_every, root))
                base = statistics.median(x["s_per_step"] for x in runs[(1, 1)])
                cells = []
                for r, w in SHAPES:
                    s = statistics.median(x["s_per_step"] for x in runs[(r, w)])
                    cells.append(f"{r}x{w} {s * 1e3:6.1f} ms/step x{r * w * base / s:4.2f}")
                print(f"{task:5} {layout:4} | " + " | ".join(cells), flush=True)
            one = runs[(2, 2)][0]
            allreduce = 2 * (4 - 1) * one["param_bytes"]  # ring all-reduce over 4 workers, all ranks
            print(f"{task:5} model {one['param_bytes'] / 1e6:.2f} MB: 2x2 crosses replicas "
                  f"{one['crossing'] / 1e3:.1f} kB/step vs sync-SGD all-reduce over 4 workers "
                  f"{allreduce / 1e6:.2f} MB/step ({allreduce / max(one['crossing'], 1):.0f}x less)",
                  flush=True)


if __name__ == "__main__":
    main()
