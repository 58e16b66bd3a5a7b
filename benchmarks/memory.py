"""Peak memory of ψ (fused and chunked vs the autograd form) and of teachers (fp32 vs bf16;
DDP vs FSDP2 over 2 ranks) against the model's size (issue 9, benchmark 3).

Every figure is measured in a fresh process, as resident memory (RSS) of that process: the
peak is Linux's VmHWM, reset (``/proc/self/clear_refs``) after imports and inputs are
allocated, minus the RSS at that point; "held" is the RSS left when a stage ends, minus the
same baseline. (tracemalloc does not see torch's allocator; RSS counts every page touched.)

1. ψ: forward + backward of ψ on fp32 logits [N, V] toward teacher probabilities [N, V]:
   the autograd form (``log_softmax`` + ``kl_div``, as ``psi_cost.py``), the fused chunked
   ``distill_loss``, and the fused φ+ψ ``fused_loss`` (from the teacher's logits) the training
   step uses.
   The gradient of the logits is one [N, V] tensor that every form must write.
2. Teachers, one process: two replicas (transformer LMs) and a ``MemoryExchange``; replica 1
   publishes, replica 0 refreshes once (its teacher is built and loaded) and runs it once.
4. Fused-linear ψ (``--parts linear``): a causal-LM head on hidden states [N, H] with one
   teacher (its own hidden states and head), φ + ψ forward + backward: materialised (logits
   = hidden @ Wᵀ for student and teacher, then ``fused_loss``) against ``fused_linear_loss``
   (chunks of rows; no [N, V] tensor). Peak RSS and the median time of the pass.
3. Ranks: ``torchrun --nproc-per-node=2`` (gloo, OMP_NUM_THREADS=1) runs this file with
   ``--rank-worker``: one replica of 2 ranks laid out by ``codistill.parallel.layout`` (DDP,
   or FSDP2 with the teacher sharded the same way), a peer version in a directory exchange
   written beforehand by another process, then publish + refresh once and one training step
   (Adam, fused φ+ψ); each rank reports its own memory.

Children run with one thread and glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``),
so a freed tensor's pages go back to the system at once and "held" is live memory. Each
child first runs its whole pipeline on a tiny model, so code pages are not counted.

    .venv/bin/python benchmarks/memory.py            # all three, ≈ 10 minutes on 2 busy cores
    .venv/bin/python benchmarks/memory.py --parts psi --rows 700 2800 --vocab 8192 32768 131072
    .venv/bin/python benchmarks/memory.py --parts teachers ranks --sizes 10M 50M 200M
    .venv/bin/python benchmarks/memory.py --parts linear --rows 2048 --vocab 131072 262144 --hidden 64
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from distributed_step import free_port  # same folder: benchmarks are run as scripts

MB = 1 << 20
HERE = os.path.abspath(__file__)
# One thread; glibc's malloc with a fixed mmap threshold, so that a freed tensor's pages go
# back to the system at once and "held" is live memory, not what the heap happened to keep.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def lm(vocab: int, dim: int, layers: int, heads: int) -> dict[str, Any]:
    return {"name": "transformer", "vocab_size": vocab, "dim": dim, "num_layers": layers, "heads": heads,
            "max_len": 64}


# Transformer LMs of about 10M, 50M and 200M parameters (2M for a quick look).
SIZES = {"2M": lm(4096, 128, 4, 4), "10M": lm(8192, 256, 8, 4), "50M": lm(16384, 512, 10, 8),
         "200M": lm(32768, 1024, 12, 16)}
TINY = lm(64, 16, 2, 2)  # warm-up runs
BATCH, SEQ = 2, 32  # tokens per rank / replica in the teacher and rank measurements
STEP = 50  # the exchange step the versions are published at


# -- memory probes (Linux) ---------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Probe:
    """RSS relative to a baseline; ``stage()`` starts a new peak (VmHWM reset)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self.start()

    def start(self) -> None:
        """Take the baseline here."""
        gc.collect()
        self.base = self._reset()

    @staticmethod
    def _reset() -> int:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return _status_kb("VmRSS") * 1024

    def stage(self, name: str) -> None:
        self.end()
        gc.collect()
        self._reset()
        self._name = name

    def end(self) -> None:
        if self._name is not None:
            peak, held = _status_kb("VmHWM") * 1024, _status_kb("VmRSS") * 1024
            self.stages[self._name] = {"peak": (peak - self.base) / MB, "held": (held - self.base) / MB}
            self._name = None


def n_params(spec: dict[str, Any]) -> int:
    import torch

    from codistill.models import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(spec).parameters())


def tokens(spec: dict[str, Any], seed: int = 0) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(spec["vocab_size"], (BATCH, SEQ + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


# -- 1. ψ, one form on one shape -------------------------------------------------------------
def child_psi(rows: int, vocab: int, form: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from codistill.fused import fused_loss
    from codistill.losses import distill_loss

    torch.set_num_threads(1)

    def inputs(n: int, v: int) -> tuple[Any, Any, Any]:
        g = torch.Generator().manual_seed(v)
        logits = torch.randn(n, v, generator=g).requires_grad_()
        return logits, torch.softmax(torch.randn(n, v, generator=g), -1), torch.randint(v, (n,), generator=g)

    def psi(logits: Any, p: Any, y: Any) -> None:
        if form == "autograd":
            loss = F.kl_div(torch.log_softmax(logits, -1), p, reduction="batchmean")
        elif form == "fused":
            loss = distill_loss(logits, p)
        else:  # the teacher's logits stand in p's place: the same size
            loss = fused_loss(logits, [p], y).total
        loss.backward()

    psi(*inputs(8, 64))  # warm-up: the code's own pages are not ψ's memory
    logits, p, y = inputs(rows, vocab)
    probe = Probe()
    probe.stage("psi")
    psi(logits, p, y)
    probe.end()
    return probe.stages["psi"]


# -- 4. fused-linear ψ, one form on one shape ---------------------------------------------------
def child_linear(rows: int, vocab: int, hidden: int, form: str, repeats: int) -> dict[str, Any]:
    import torch

    from codistill.fused import fused_linear_loss, fused_loss

    torch.set_num_threads(1)

    def inputs(n: int, v: int) -> tuple[Any, ...]:
        g = torch.Generator().manual_seed(v)
        h = torch.randn(n, hidden, generator=g).requires_grad_()
        w = (torch.randn(v, hidden, generator=g) / hidden**0.5).requires_grad_()
        th, tw = torch.randn(n, hidden, generator=g), torch.randn(v, hidden, generator=g) / hidden**0.5
        return h, w, th, tw, torch.randint(v, (n,), generator=g)

    def once(h: Any, w: Any, th: Any, tw: Any, y: Any) -> None:
        h.grad = w.grad = None
        if form == "materialised":
            with torch.no_grad():
                teacher = th @ tw.t()
            loss = fused_loss(h @ w.t(), [teacher], y).total
        else:
            loss = fused_linear_loss(h, w, [(th, tw)], y).total
        loss.backward()

    once(*inputs(8, 64))  # warm-up: the code's own pages are not the loss's memory
    args = inputs(rows, vocab)
    probe = Probe()
    probe.stage("pass")
    once(*args)
    probe.end()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once(*args)
        times.append(time.perf_counter() - t0)
    return {**probe.stages["pass"], "seconds": statistics.median(times)}


def part_linear(rows: list[int], vocab: list[int], hidden: int, repeats: int) -> None:
    forms = ("materialised", "fused-linear")
    print(f"\n## 4. φ + ψ from hidden states (H = {hidden}), one teacher, forward + backward, fp32, "
          "one thread\n")
    print("peak RSS increase (MB) of one pass in a fresh process; time: median of "
          f"{repeats} passes after it\n")
    print("| N | V | one [N, V] (MB) | materialised peak | fused-linear peak | peak ratio | "
          "materialised (s) | fused-linear (s) | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in rows:
        for v in vocab:
            got = {f: json.loads(subprocess.run(
                [sys.executable, HERE, "--child", "linear", str(n), str(v), str(hidden), f, str(repeats)],
                env=ENV, check=True, capture_output=True, text=True).stdout) for f in forms}
            one = n * v * 4 / MB
            (pa, ta), (pb, tb) = ((got[f]["peak"], got[f]["seconds"]) for f in forms)
            print(f"| {n} | {v} | {one:.0f} | {pa:.0f} | {pb:.0f} | {pa / max(pb, 1e-9):.1f}x | {ta:.2f} | "
                  f"{tb:.2f} | {tb / ta:.2f} |", flush=True)
    from codistill.fused import LINEAR_CHUNK_ELEMENTS, LINEAR_MIN_ROWS

    mb = LINEAR_CHUNK_ELEMENTS * 4 / MB
    print(f"\n(fused-linear chunks of {LINEAR_CHUNK_ELEMENTS} elements = {mb:.0f} MB of logits per fp32 "
          f"temporary, but at least {LINEAR_MIN_ROWS} rows)")


# -- 2. one teacher in one process -----------------------------------------------------------
def teacher_pipeline(spec: dict[str, Any], dtype: str, probe: Probe | None) -> None:
    import torch

    from codistill import Codistiller, MemoryExchange, TeacherSpec
    from codistill.models import build_model

    stage = probe.stage if probe is not None else (lambda name: None)
    torch.manual_seed(0)
    models = [build_model(spec), build_model(spec)]
    ex = MemoryExchange()
    td = torch.bfloat16 if dtype == "bf16" else None
    cds = [Codistiller(m, ex, replica=r, num_replicas=2, exchange_every=STEP, model_spec=spec,
                       teachers=TeacherSpec(dtype=td)) for r, m in enumerate(models)]
    x, _ = tokens(spec)
    if probe is not None:
        probe.start()  # the two replicas are the baseline
    stage("publish")  # the exchange's copy of replica 1's weights
    cds[1].publish(STEP)
    stage("refresh")  # replica 0 builds its teacher of replica 1 and loads it
    cds[0].refresh(STEP)
    stage("forward")  # the teacher's averaged prediction on one batch
    probs = cds[0].distill_target(x, STEP)
    del probs
    if probe is not None:
        probe.end()


def child_teacher(size: str, dtype: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    teacher_pipeline(TINY, dtype, None)  # warm-up: the code's own pages
    probe = Probe()
    teacher_pipeline(SIZES[size], dtype, probe)
    return probe.stages


# -- 3. one rank of a 2-rank replica (under torchrun) ----------------------------------------
def prepare_peer(spec: dict[str, Any], folder: str) -> None:
    """Write replica 1's version STEP into the directory exchange ``folder``."""
    import torch

    from codistill.exchange import DirectoryExchange
    from codistill.models import build_model

    torch.manual_seed(1)
    DirectoryExchange(folder).publish(1, STEP, build_model(spec).state_dict(), {"replica": 1, "model": spec})


def replica_pipeline(spec: dict[str, Any], parallel: str, folder: str, probe: Probe | None) -> None:
    """Build one replica on this rank, publish + refresh once, one training step."""
    import torch
    import torch.distributed as dist

    from codistill import Codistiller, TeacherSpec
    from codistill.exchange import BackgroundExchange, DirectoryExchange
    from codistill.fused import fused_loss
    from codistill.models import build_model
    from codistill.parallel import layout

    stage = probe.stage if probe is not None else (lambda name: None)
    rank, group = dist.get_rank(), dist.group.WORLD
    x, y = tokens(spec, seed=rank)
    dist.barrier()
    stage("model")  # built whole (as replica.build_replica does), then laid out
    torch.manual_seed(0)
    wrap = layout(parallel, group, "cpu")
    model = build_model(spec)
    model = wrap(model) if wrap is not None else model
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    dist.barrier()
    stage("publish+refresh")  # the first rank writes in the background (as launch.py)
    exchange = BackgroundExchange(DirectoryExchange(folder)) if rank == 0 else DirectoryExchange(folder)
    cd = Codistiller(model, exchange, replica=0, num_replicas=2, exchange_every=STEP, model_spec=spec,
                     process_group=group, teachers=TeacherSpec(layout=wrap if parallel == "fsdp" else None))
    cd.publish(STEP)
    cd.refresh(STEP)
    cd.exchange.flush()
    if cd.teacher_versions()[1] != STEP:
        raise RuntimeError(f"rank {rank}: the teacher was not loaded: {cd.teacher_versions()}")
    dist.barrier()
    stage("step")  # student forward, teacher forward, fused φ+ψ, backward, Adam
    logits = model(x)
    alpha, teacher_logits = cd.distill_target(x, STEP)
    fused_loss(logits, teacher_logits, y, alpha).total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del logits, teacher_logits
    dist.barrier()
    if probe is not None:
        probe.end()
    cd.close()


def rank_worker(size: str, parallel: str, folder: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    warm = os.path.join(out, "warm-up")
    if rank == 0:
        prepare_peer(TINY, warm)
    replica_pipeline(TINY, parallel, warm, None)  # warm-up: code pages, gloo and FSDP2 state
    gc.collect()
    probe = Probe()
    replica_pipeline(SIZES[size], parallel, folder, probe)
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(probe.stages, f)
    dist.destroy_process_group()


# -- the driver ----------------------------------------------------------------------------
def run_child(*args: str) -> Any:
    r = subprocess.run([sys.executable, HERE, "--child", *args], check=True, capture_output=True, text=True,
                       env=ENV)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_ranks(size: str, parallel: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as root:
        folder, out = os.path.join(root, "exchange"), os.path.join(root, "out")
        os.makedirs(out)
        run_child("peer", size, folder)
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--nproc-per-node=2", f"--master-port={free_port()}", HERE, "--rank-worker",
               size, parallel, folder, out]
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        if r.returncode:
            sys.exit(f"torchrun failed ({parallel}, {size}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return [json.load(open(os.path.join(out, f"rank{i}.json"), encoding="utf-8")) for i in range(2)]


def med(runs: list[dict[str, Any]], *keys: str) -> float:
    def get(d: Any) -> float:
        for k in keys:
            d = d[k]
        return d

    return statistics.median(get(r) for r in runs)


def part_psi(rows: list[int], vocab: list[int], repeats: int) -> None:
    forms = ("autograd", "fused", "fused φ+ψ")
    print(f"\n## 1. ψ forward + backward, fp32, peak RSS increase (MB), median of {repeats}\n")
    print("one [N, V] fp32 tensor = the gradient every form writes; ratio = autograd / fused\n")
    print("| N | V | one [N, V] (MB) | autograd | fused, chunked | fused φ+ψ | autograd in [N, V] | "
          "fused in [N, V] | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in rows:
        for v in vocab:
            runs: dict[str, list[dict[str, Any]]] = {f: [] for f in forms}
            for _ in range(repeats):  # interleaved
                for f in forms:
                    runs[f].append(run_child("psi", str(n), str(v), f))
            one = n * v * 4 / MB
            a, b, c = (med(runs[f], "peak") for f in forms)
            print(f"| {n} | {v} | {one:.1f} | {a:.1f} | {b:.1f} | {c:.1f} | {a / one:.2f} | {b / one:.2f} | "
                  f"{a / max(b, 1e-9):.2f}x |", flush=True)
    from codistill.fused import CHUNK_ELEMENTS

    print(f"\n(the fused forms work over chunks of {CHUNK_ELEMENTS} elements = {CHUNK_ELEMENTS * 4 / MB:.0f} "
          "MB per fp32 temporary)")


def part_teachers(sizes: list[str], repeats: int) -> None:
    print(f"\n## 2. One teacher, one process (MemoryExchange), RSS increase (MB), median of {repeats}\n")
    print("held = RSS left after the stage; peak = the stage's high-water mark\n")
    print("| model | params | fp32 weights (MB) | teacher dtype | exchange copy held | teacher held | "
          "refresh peak | teacher forward peak | teacher held / fp32 weights |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        n = n_params(SIZES[size])
        w = n * 4 / MB
        runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "bf16": []}
        for _ in range(repeats):
            for dt in runs:
                runs[dt].append(run_child("teacher", size, dt))
        for dt, rs in runs.items():
            copy = med(rs, "publish", "held")
            held = med(rs, "refresh", "held") - copy
            refresh = med(rs, "refresh", "peak") - copy
            forward = med(rs, "forward", "peak") - med(rs, "refresh", "held")
            print(f"| {size} | {n / 1e6:.1f}M | {w:.0f} | {dt} | {copy:.0f} | {held:.0f} | {refresh:.0f} | "
                  f"{forward:.0f} | {held / w:.2f} |", flush=True)


def part_ranks(sizes: list[str], repeats: int) -> None:
    print("\n## 3. One replica over 2 ranks (torchrun, gloo), per-rank RSS increase (MB), "
          f"median of {repeats}\n")
    print("held after the stage (its peak); fp32 teacher (FSDP2: sharded like the student); the first "
          "rank also keeps the host copy it publishes from\n")
    print("| model | fp32 weights (MB) | layout | rank | model | + publish, refresh | + training step | "
          "peak / weights |")
    print("|---|---|---|---|---|---|---|---|")
    stages = ("model", "publish+refresh", "step")
    ratios = []
    for size in sizes:
        w = n_params(SIZES[size]) * 4 / MB
        runs: dict[str, list[list[dict[str, Any]]]] = {"ddp": [], "fsdp": []}
        for _ in range(repeats):
            for par in runs:
                runs[par].append(run_ranks(size, par))
        peaks: dict[tuple[str, int], float] = {}
        helds: dict[tuple[str, int], float] = {}
        for par, rs in runs.items():
            for rank in range(2):
                per = [r[rank] for r in rs]
                peak = max(med(per, s, "peak") for s in stages)
                peaks[par, rank], helds[par, rank] = peak, med(per, "step", "held")
                cells = " | ".join(f"{med(per, s, 'held'):.0f} ({med(per, s, 'peak'):.0f})" for s in stages)
                print(f"| {size} | {w:.0f} | {par} | {rank} | {cells} | {peak / w:.2f} |", flush=True)
        ratios.append((size, peaks, helds))
    print("\n| model | rank | FSDP2 / DDP peak | FSDP2 / DDP held after the step |")
    print("|---|---|---|---|")
    for size, peaks, helds in ratios:
        for rank in range(2):
            print(f"| {size} | {rank} | {peaks['fsdp', rank] / peaks['ddp', rank]:.2f} | "
                  f"{helds['fsdp', rank] / helds['ddp', rank]:.2f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        rank_worker(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, args = sys.argv[2], sys.argv[3:]
        if what == "psi":
            print(json.dumps(child_psi(int(args[0]), int(args[1]), args[2])))
        elif what == "linear":
            print(json.dumps(child_linear(*(int(x) for x in args[:3]), args[3], int(args[4]))))
        elif what == "teacher":
            print(json.dumps(child_teacher(args[0], args[1])))
        else:
            prepare_peer(SIZES[args[0]], args[1])
            print("{}")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["psi", "teachers", "ranks", "linear"]
    ap.add_argument("--parts", nargs="+", choices=parts, default=parts[:3])
    ap.add_argument("--rows", type=int, nargs="+", default=[700, 2800], help="N = batch × time positions")
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--hidden", type=int, default=64, help="linear: the hidden size H")
    ap.add_argument("--linear-repeats", type=int, default=3, help="linear: timed passes per form")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["10M", "50M", "200M"])
    ap.add_argument("--psi-repeats", type=int, default=1, help="ψ processes per shape and form (its "
                    "figures repeat to 0.1 MB)")
    ap.add_argument("--repeats", type=int, default=2, help="teacher processes per size and dtype")
    ap.add_argument("--rank-repeats", type=int, default=1, help="torchrun jobs per layout and size")
    a = ap.parse_args()
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("memory.py reads /proc (Linux)")
    t0 = time.perf_counter()
    if "psi" in a.parts:
        part_psi(a.rows, a.vocab, a.psi_repeats)
    if "teachers" in a.parts:
        part_teachers(a.sizes, a.repeats)
    if "ranks" in a.parts:
        part_ranks(a.sizes, a.rank_repeats)
    if "linear" in a.parts:
        part_linear(a.rows, a.vocab, a.hidden, a.linear_repeats)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
