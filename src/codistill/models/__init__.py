"""Model registry: a model is described by a spec ``{"name": ..., **settings}``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .click import ClickModel
from .lstm import LSTMLM
from .transformer import TransformerLM
from .vision import ResNet, SmallCNN

MODELS: dict[str, type[nn.Module]] = {"lstm": LSTMLM, "transformer": TransformerLM, "cnn": SmallCNN,
                                      "resnet": ResNet, "click": ClickModel}


def register_model(name: str, cls: type[nn.Module]) -> None:
    """Make ``cls`` buildable from a spec whose ``name`` is ``name``."""
    MODELS[name] = cls


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build a model from its spec; errors name the bad ``model.*`` setting."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
    cls = MODELS[name]
    params = inspect.signature(cls.__init__).parameters
    for key in spec:
        if key not in params or key == "self":
            allowed = sorted(p for p in params if p != "self")
            raise ValueError(f"model.{key} is not a setting of model {name!r} (settings: {allowed})")
    return cls(**spec)


__all__ = ["ClickModel", "LSTMLM", "MODELS", "ResNet", "SmallCNN", "TransformerLM", "build_model",
           "register_model"]
