"""Running a study's arms: one run directory per resolved config, finished arms skipped,
learning rates tuned per arm on one grid, and the statistics the report quotes.

An arm is a normal run directory ``OUT/arms/NAME-KEY`` where KEY hashes the resolved config,
so rerunning a recipe (or another recipe needing the same run) finds it finished and skips
it; an arm cut off part-way resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import RunConfig, from_dict
from ..runlog import eval_curve, read_metrics
from ..tasks import Task, build_task

log = logging.getLogger(__name__)

TUNE_SEED = 1000  # the seed tuning runs use; no reported figure uses it
GUARDS = ("on_nonfinite", "diverge_factor", "dist_timeout")
# The engine's replicas never drift; who may publish and which run is read leave the numbers alone.
CODISTILL_GUARDS = ("max_teacher_size", "max_drift", "exchange_key_file", "run_id")
# Fields added after studies were run, left out of the key while they hold their defaults
# (which give the numbers the earlier code gave), so finished arms keep their keys.
LATER = {"parallel": "ddp", "precision": "fp32"}
CODISTILL_LATER = {"teacher_dtype": "auto", "shard_teachers": True, "publish_dtype": "fp32"}


def _started_name(run_dir: str, default: str) -> str:
    """The ``name`` in the run directory's resolved config (``default`` if unreadable)."""
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            name = yaml.safe_load(f).get("name")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return default
    return name if isinstance(name, str) else default


def arm_key(cfg: RunConfig) -> str:
    """A short hash of everything that decides the run's numbers (not its name)."""
    values = cfg.to_dict()
    for k in ("name", "threads", "log_every", *GUARDS):  # guards decide if a run fails, not its numbers
        values.pop(k, None)
    for k in CODISTILL_GUARDS:
        values["codistill"].pop(k, None)
    for section, later in ((values, LATER), (values["codistill"], CODISTILL_LATER)):
        for k, default in later.items():
            if section.get(k) == default:
                section.pop(k)
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclass
class ArmResult:
    """A finished arm: its config, directory and metric rows."""

    cfg: RunConfig
    dir: str
    rows: list[dict[str, Any]]

    def curve(self, who: int | str = 0, key: str = "loss") -> list[tuple[int, float]]:
        """``(step, value)`` of the evaluations of replica ``who`` (or ``"ensemble"``)."""
        return eval_curve(self.rows, who, key)

    def final(self, who: int | str = 0, key: str = "loss") -> float:
        curve = self.curve(who, key)
        return curve[-1][1] if curve else math.nan

    def final_mean(self, key: str = "loss") -> float:
        """The final ``key`` averaged over the run's replicas."""
        return statistics.fmean(self.final(r, key) for r in range(self.cfg.replicas))


class Study:
    """Runs arms under ``root`` with the one-process engine: one at a time in this process,
    or, through :meth:`run_all` / :meth:`tuned_arms`, up to ``jobs`` at once in worker processes.

    ``seeds``: how many seeds (or retrain pairs) a recipe reports; ``quick``: the smoke-test
    size; ``profile``: the hardware a recipe is sized for (``cpu``; ``gpu`` where a recipe has
    one); ``report_dir``: where ``results.md`` and its plots go (plots under ``results/``).
    """

    def __init__(self, root: str, report_dir: str | None = None, seeds: int = 3, quick: bool = False,
                 progress: bool = False, threads: int = 0, jobs: int = 1, profile: str = "cpu") -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.root, self.report_dir, self.threads, self.jobs = root, report_dir or root, threads, jobs
        self.seeds, self.quick, self.progress, self.profile = seeds, quick, progress, profile
        self._trained: set[str] = set()  # arm directories trained by this study
        self._read: set[str] = set()  # every arm directory it returned
        self._tasks: dict[str, Task] = {}  # loaded data, shared by the arms that use it

    @property
    def ran(self) -> int:
        """Arms this study trained."""
        return len(self._trained)

    @property
    def skipped(self) -> int:
        """Arms it found finished by an earlier run."""
        return len(self._read - self._trained)

    def plot_path(self, name: str) -> tuple[str, str]:
        """(file path, path relative to the report) of a plot called ``name``."""
        rel = f"results/{name}.png"
        return os.path.join(self.report_dir, rel), rel

    def arm_dir(self, cfg: RunConfig) -> str:
        """``arms/NAME-KEY``; an arm with the same KEY under another name is the same arm."""
        key = arm_key(cfg)
        same = sorted(glob.glob(os.path.join(glob.escape(self.root), "arms", f"*-{key}")),
                      key=lambda d: not self.finished(d, cfg))
        if same:
            return same[0]
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", cfg.name)
        return os.path.join(self.root, "arms", f"{slug}-{key}")

    @staticmethod
    def finished(run_dir: str, cfg: RunConfig) -> bool:
        """The run reached its last step and wrote its final weights."""
        try:
            with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, ValueError):
            return False
        return summary.get("end") == cfg.steps and len(summary.get("weights") or []) == cfg.replicas

    def run(self, cfg: RunConfig) -> ArmResult:
        """Train ``cfg`` unless an identical arm already finished; return its results."""
        from ..engine import run

        if self.threads:  # not part of the arm's key: it changes speed (and rounding), not the recipe
            cfg.threads = self.threads
        out = self.arm_dir(cfg)
        if self.finished(out, cfg):
            log.info("arm %s: finished earlier (%s), skipped", cfg.name, out)
        else:
            resume = os.path.isdir(os.path.join(out, "checkpoints"))
            if resume:  # the arm as it was started: its key ignores the name, a resume may not change it
                cfg = dataclasses.replace(cfg, name=_started_name(out, cfg.name))
            log.info("arm %s -> %s%s", cfg.name, out, " (resuming)" if resume else "")
            run(cfg, out, progress=self.progress, overwrite=not resume, resume=resume, task=self.task(cfg))
            self._trained.add(out)
        self._read.add(out)
        return ArmResult(cfg, out, read_metrics(out))

    def run_all(self, cfgs: Sequence[RunConfig]) -> list[ArmResult]:
        """:meth:`run` every config; the unfinished ones ``jobs`` at a time in worker processes
        (each with ``threads`` torch threads, 1 if unset), so independent arms share the cores."""
        dirs = {self.arm_dir(c): c for c in cfgs}
        todo = {d: c for d, c in dirs.items() if not self.finished(d, c)}
        if self.jobs > 1 and len(todo) > 1:
            jobs = min(self.jobs, len(todo))
            log.info("running %d arm(s), %d at a time", len(todo), jobs)
            ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
            with ctx.Pool(jobs, _init_worker, (self.root, self.threads or 1)) as pool:
                for name in pool.imap_unordered(_run_in_worker, [c.to_dict() for c in todo.values()]):
                    log.info("arm %s finished", name)
            self._trained.update(todo)
        return [self.run(c) for c in cfgs]

    def task(self, cfg: RunConfig) -> Task:
        """The task of ``cfg``, loaded once per data settings (the last few are kept)."""
        key = json.dumps([cfg.task, dataclasses.asdict(cfg.data)], sort_keys=True, default=str)
        if key not in self._tasks:
            while len(self._tasks) >= 3:
                self._tasks.pop(next(iter(self._tasks)))
            self._tasks[key] = build_task(cfg)
        return self._tasks[key]

    def tuned_arm(self, base: dict[str, Any], name: str, grid: Sequence[float], seeds: Sequence[int],
                  metric: str = "loss", higher_is_better: bool = False) -> TunedArm:
        """Tune ``optimizer.lr`` on ``grid`` (tuning seed 1000), then run every seed with it."""
        return self.tuned_arms({name: base}, grid, seeds, metric, higher_is_better)[name]

    def tuned_arms(self, bases: dict[str, dict[str, Any]], grid: Sequence[float], seeds: Sequence[int],
                   metric: str = "loss", higher_is_better: bool = False) -> dict[str, TunedArm]:
        """:meth:`tuned_arm` for each ``name: base``; the runs of every arm's tuning, then of
        every arm's seeds, go through :meth:`run_all` together."""
        self.run_all([make_config(base, {"optimizer.lr": v, "seed": TUNE_SEED, "name": f"{name}-tune-{v:g}"})
                      for name, base in bases.items() for v in grid])
        tuned = {name: self.tune(base, "optimizer.lr", grid, TUNE_SEED, name, metric, higher_is_better)
                 for name, base in bases.items()}
        cfgs = {name: make_config(base, {"optimizer.lr": tuned[name][0]}).to_dict()
                for name, base in bases.items()}
        runs = self.run_all([make_config(cfgs[name], {"seed": s, "name": f"{name}-seed{s}"})
                             for name in bases for s in seeds])
        out, n = {}, len(seeds)
        for i, name in enumerate(bases):
            out[name] = TunedArm(tuned[name][0], tuned[name][1], runs[i * n:(i + 1) * n], cfgs[name])
        return out

    def tune(self, base: dict[str, Any], key: str, grid: Sequence[float], seed: int,
             name: str, metric: str = "loss", higher_is_better: bool = False
             ) -> tuple[float, dict[float, float]]:
        """Pick the value of ``key`` (dotted, e.g. ``optimizer.lr``) from ``grid`` whose run
        with the tuning ``seed`` ends with the best final ``metric`` (mean over replicas).

        The tuning seed is kept apart from the seeds a recipe reports, so no arm is tuned on
        the figure that is reported. Returns the chosen value and every value's result.
        """
        if not grid:
            raise ValueError(f"{name}: empty grid for {key}")
        results: dict[float, float] = {}
        for value in grid:
            cfg = make_config(base, {key: value, "seed": seed, "name": f"{name}-tune-{value:g}"})
            res = self.run(cfg).final_mean(metric)
            results[value] = res if math.isfinite(res) else (-math.inf if higher_is_better else math.inf)
        pick = max if higher_is_better else min
        best = pick(results, key=lambda v: results[v])
        log.info("%s: %s tuned on seed %d: %s -> %g", name, key, seed,
                 ", ".join(f"{v:g}: {r:.4f}" for v, r in results.items()), best)
        return best, results


@dataclass
class TunedArm:
    """An arm whose learning rate was tuned: the value chosen, the grid's results, the runs."""

    lr: float
    tuning: dict[float, float]
    runs: list[ArmResult]
    config: dict[str, Any]  # the tuned config (without seed and name)


_worker_study: Study | None = None


def _init_worker(root: str, threads: int) -> None:
    global _worker_study
    _worker_study = Study(root, threads=threads)


def _run_in_worker(values: dict[str, Any]) -> str:
    assert _worker_study is not None
    cfg = from_dict(values)
    _worker_study.run(cfg)
    return cfg.name


def make_config(base: dict[str, Any], sets: dict[str, Any]) -> RunConfig:
    """A validated config: ``base`` (plain values) with dotted-key ``sets`` applied."""
    values = json.loads(json.dumps(base))
    for dotted, value in sets.items():
        node = values
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return from_dict(values)


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN values are dropped)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 4) -> str:
    """``mean ± sd`` of ``values``."""
    m, s = mean_spread(values)
    return "–" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def tuning_text(results: dict[str, dict[float, float]]) -> str:
    """``arm: value → result, ...; arm: ...`` for the report."""
    return "; ".join(f"{arm}: " + ", ".join(f"{v:g} → {r:.4f}" for v, r in t.items())
                     for arm, t in results.items())


def preamble(name: str, study: Study, doc: str | None) -> str:
    """A section's opening: the command that produced it and the recipe's description (its
    module docstring after the first paragraph, or all of it)."""
    parts = (doc or "").strip().split("\n\n", 1)
    text = parts[-1].strip()
    return (f"Command: `codistill reproduce {name}{' --quick' if study.quick else ''} "
            f"--seeds {study.seeds}`.\n\n{text}\n\n")
