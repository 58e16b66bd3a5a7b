"""Recipes that measure the paper's claims: ``codistill reproduce NAME``.

Each recipe trains its arms through a :class:`Study` (one run directory per resolved
config, finished arms skipped) and returns a :class:`Section` of the report; the report,
``results.md``, is assembled from every section present.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from . import ablations, click_churn, compression, lm_large, local_sgd, offline, scaling, scaling_factors
from .results import Section, assemble, save_section
from .study import ArmResult, Study, make_config

log = logging.getLogger(__name__)

RECIPES: dict[str, Callable[[Study], Section]] = {  # in the report's order
    scaling.LM.name: scaling.run_lm,
    scaling.IMAGE.name: scaling.run_image,
    lm_large.NAME: lm_large.run,
    scaling_factors.NAME: scaling_factors.run,
    ablations.NAME: ablations.run,
    click_churn.NAME: click_churn.run,
    offline.NAME: offline.run,
    local_sgd.NAME: local_sgd.run,
    compression.NAME: compression.run,
}


def reproduce(names: list[str], out: str, report_dir: str | None = None, seeds: int = 3,
              quick: bool = False, progress: bool = False, threads: int = 0, jobs: int = 1,
              profile: str = "cpu") -> str:
    """Run the recipes ``names`` (``all``: every one) under ``out``; write each one's section
    (``REPORT_DIR/sections/NAME/``) and ``REPORT_DIR/results.md``, assembled from every section
    there (``report_dir`` defaults to ``out``); return its path. ``jobs``: arms trained at once;
    ``profile``: ``cpu``, or ``gpu`` for the recipes sized for one large GPU (lm-large)."""
    if "all" in names:
        names = list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; choose from {sorted(RECIPES)} or 'all'")
    gpu_ready = {lm_large.NAME}
    if profile not in ("cpu", "gpu"):
        raise ValueError(f"--profile must be 'cpu' or 'gpu', got {profile!r}")
    if profile == "gpu" and set(names) - gpu_ready:
        raise ValueError(f"--profile gpu exists only for {sorted(gpu_ready)}, "
                         f"not {sorted(set(names) - gpu_ready)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    study = Study(out, report_dir, seeds=seeds, quick=quick, progress=progress, threads=threads, jobs=jobs,
                  profile=profile)
    path = ""
    sections = os.path.join(study.report_dir, "sections")  # kept with the report, so it can be committed
    for name in names:
        log.info("recipe %s (%s, %d seed(s)) -> %s", name, "quick" if quick else "full", seeds, out)
        save_section(RECIPES[name](study), os.path.join(sections, name))
        path = assemble(sections, study.report_dir, list(RECIPES))  # after each recipe: reports as it goes
    log.info("%d arm(s) trained, %d finished earlier; report: %s", study.ran, study.skipped, path)
    return path


__all__ = ["RECIPES", "ArmResult", "Section", "Study", "make_config", "reproduce"]
