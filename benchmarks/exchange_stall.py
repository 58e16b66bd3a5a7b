"""How long the training thread stalls to publish and to refresh, against model size.

For each size (a stack of square linear layers, 1M to 300M parameters by default) this
measures, in one process with a real directory exchange on local disk:

* the training step (forward, backward, Adam) at batch 32: what a stall is compared with;
* publish: what ``Codistiller.publish`` costs the training thread (the copy into reused
  host buffers; the serialisation, checksum and write run on the background writer, whose
  time is shown too: it must stay under K steps), and the same publish written synchronously;
* refresh: ``Codistiller.refresh`` loading a peer's new version that the prefetch thread
  has read meanwhile (only the copy into the preallocated teacher is on the training
  thread), and without prefetching (read, checksum, header check and copy on the thread);
* the floor: a plain memcpy of the weights, and a plain write + fsync of their bytes.

It prints medians over repeats and the stall per exchange as a share of K steps (goal: < 1%
at K = 50).

    .venv/bin/python benchmarks/exchange_stall.py [--sizes 1e6 1e7 1e8 3e8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from codistill import Codistiller, Newest
from codistill.exchange import BackgroundExchange, DirectoryExchange


def stack(params: float, layers: int = 4) -> nn.Module:
    width = int((params / layers) ** 0.5)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(params: float, repeats: int, k: int, root: str, dtype: str = "fp32") -> dict[str, float]:
    torch.manual_seed(0)
    model, peer = stack(params), stack(params)
    width = model[0].in_features
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randn(32, width)

    def step() -> None:
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t_step = median_time(step, repeats)
    folder = tempfile.mkdtemp(dir=root)
    background = Codistiller(model, BackgroundExchange(DirectoryExchange(folder)), replica=0,
                             num_replicas=2, exchange_every=k, publish_dtype=dtype)
    direct = Codistiller(model, DirectoryExchange(folder), replica=0, num_replicas=2, exchange_every=k,
                         publish_dtype=dtype)
    reader = Codistiller(peer, DirectoryExchange(folder), replica=1, num_replicas=2, exchange_every=k)
    steps = iter(range(k, 10**9, k))

    pub, writer = [], []
    for _ in range(repeats):  # K steps pass between publishes: the previous write is done
        t0 = time.perf_counter()
        background.publish(next(steps))
        t1 = time.perf_counter()
        background.exchange.flush()
        pub.append(t1 - t0)
        writer.append(time.perf_counter() - t1)
    t_pub, t_writer = statistics.median(pub), statistics.median(writer)
    t_direct = median_time(lambda: direct.publish(next(steps)), repeats)

    cold = Codistiller(stack(params), DirectoryExchange(folder), replica=1, num_replicas=2, exchange_every=k,
                       wait=Newest(prefetch=False))
    reader.refresh()  # starts the prefetch thread
    t_refresh, t_cold = [], []
    for _ in range(repeats):
        step_ = next(steps)
        direct.publish(step_)  # a new version, outside the timed part
        deadline = time.time() + 600  # K steps pass: the prefetch thread reads it meanwhile
        while reader.picker.prefetcher._ready.get(0) is None and time.time() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        reader.refresh()
        t_refresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cold.refresh()
        t_cold.append(time.perf_counter() - t0)
    reader.close()
    state = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
    t_memcpy = median_time(lambda: [v.copy_(p) for v, p in zip(state.values(), model.state_dict().values())],
                           repeats)
    blob = os.urandom(1 << 20) * max(1, nbytes >> 20)
    path = os.path.join(folder, "plain.bin")

    def write() -> None:
        with open(path, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    t_write = median_time(write, repeats)
    background.close()
    return {"params": sum(p.numel() for p in model.parameters()), "mb": nbytes / 2**20, "step": t_step,
            "publish": t_pub, "writer": t_writer, "publish_sync": t_direct,
            "refresh": statistics.median(t_refresh), "refresh_cold": statistics.median(t_cold),
            "memcpy": t_memcpy, "write": t_write}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8, 3e8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=50, help="exchange interval K")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None, help="where the exchange is written (default: a temp dir)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="codistill.publish_dtype of the versions (MB stays the model's own size)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    root = a.dir or tempfile.mkdtemp(prefix="codistill-stall-")
    os.makedirs(root, exist_ok=True)
    print(f"K={a.k}, {a.threads} thread(s), versions in {a.dtype}, medians of {a.repeats}; "
          "seconds unless noted")
    print(f"{'params':>11} {'MB':>7} {'step':>7} | {'publish':>8} {'writer':>7} {'(sync)':>7} "
          f"{'refresh':>8} {'(cold)':>7} | {'memcpy':>7} {'write':>7} | {'pub/K·step':>10} "
          f"{'refresh/K·step':>14} {'writer/K·step':>13}")
    for size in a.sizes:
        r = measure(size, a.repeats, a.k, root, a.dtype)
        window = a.k * r["step"]
        print(f"{r['params']:>11,} {r['mb']:>7.1f} {r['step']:>7.3f} | {r['publish']:>8.4f} "
              f"{r['writer']:>7.3f} {r['publish_sync']:>7.3f} {r['refresh']:>8.4f} "
              f"{r['refresh_cold']:>7.3f} | {r['memcpy']:>7.4f} {r['write']:>7.3f} | "
              f"{r['publish'] / window:>10.2%} {r['refresh'] / window:>14.2%} {r['writer'] / window:>13.1%}",
              flush=True)


if __name__ == "__main__":
    main()
