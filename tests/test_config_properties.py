"""Property-based config tests: every bounded or typed field — of every section of the run
config and of every built-in task's ``data:`` section — given any invalid value, gives one
ConfigError on one line that names the field (never a traceback from deeper code)."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codistill.config import (
    CheckpointConfig,
    CodistillConfig,
    ConfigError,
    EvalConfig,
    OptimizerConfig,
    OuterConfig,
    RunConfig,
    from_dict,
)
from codistill.settings import BUILTIN_TASKS
from codistill.tasks import task_class

SECTIONS = {"": RunConfig, "optimizer.": OptimizerConfig, "codistill.": CodistillConfig,
            "outer.": OuterConfig, "eval.": EvalConfig, "checkpoint.": CheckpointConfig}


def _ruled_fields() -> list[tuple[str, str, dataclasses.Field, type]]:
    """``(task, dotted name, field, its type)`` of every field with rules: the run config's
    sections under the ``lm`` task, and each built-in task's ``data:`` section under that task."""
    sections = [("lm", prefix, cls) for prefix, cls in SECTIONS.items()]
    sections += [(task, "data.", task_class(task).Data) for task in sorted(BUILTIN_TASKS)]
    out = []
    for task, prefix, cls in sections:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata and not dataclasses.is_dataclass(hints[f.name]):
                out.append((task, prefix + f.name, f, hints[f.name]))
    return out


FIELDS = _ruled_fields()


def _number_type(tp) -> type | None:
    """``int`` or ``float`` for a field of that type, or of that type or None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _invalid(f: dataclasses.Field, tp) -> st.SearchStrategy:
    """Values that break ``f``'s rules: outside its bounds or choices, non-finite, or of
    another type altogether."""
    rules = f.metadata
    bad: list[st.SearchStrategy] = [st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)]
    if rules.get("text"):  # numbers read as strings (column names): YAML booleans are refused
        bad += [st.booleans(), st.lists(st.booleans(), min_size=1, max_size=2)]
    else:
        bad.append(st.lists(st.integers(), max_size=2))
    if "choices" in rules:
        bad.append(st.text(max_size=8).filter(lambda v: v not in rules["choices"]))
    if _number_type(tp) is not None:
        bad += [st.sampled_from([math.inf, -math.inf, math.nan]), st.text(min_size=1, max_size=5).filter(
            lambda v: not _is_number(v))]
        low = rules.get("gt", rules.get("ge"))
        if low is not None:
            edge = st.just(low) if "gt" in rules else st.nothing()
            bad.append(st.one_of(edge, st.floats(max_value=low, exclude_max=True, allow_nan=False,
                                                 allow_infinity=False, min_value=-1e12)))
        if "lt" in rules:
            bad.append(st.floats(min_value=rules["lt"], max_value=1e12, allow_nan=False))
    return st.one_of(bad)


def _is_number(text: str) -> bool:
    """Text the config reads as a number (it accepts ``1e-3`` without a dot, as ``float``)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def _set(values: dict, dotted: str, value) -> dict:
    values = copy.deepcopy(values)
    node = values
    *path, last = dotted.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return values


def test_every_section_and_task_data_section_is_covered():
    names = {name for _, name, _, _ in FIELDS}
    assert {"outer.every", "outer.lr", "outer.momentum", "checkpoint.every", "checkpoint.keep"} <= names
    for task in BUILTIN_TASKS:  # shards (DataSettings) and at least one setting of the task's own
        assert sum(t == task for t, _, _, _ in FIELDS) >= 2 and (task, "data.shards") in {
            (t, n) for t, n, _, _ in FIELDS}


def _base(tiny_config: dict, task: str) -> dict:
    """A valid config of ``task``: the tiny LM run, or the task's defaults for another task."""
    if task == "lm":
        return tiny_config
    return {**tiny_config, "task": task, "model": dict(task_class(task).default_model), "data": {},
            "codistill": {**tiny_config["codistill"], "distill": "auto"}}


@pytest.mark.parametrize("task,name,f,tp", FIELDS,
                         ids=[n if t == "lm" else f"{t}:{n}" for t, n, _, _ in FIELDS])
def test_every_invalid_value_is_one_line_naming_the_field(tiny_config, task, name, f, tp):
    base = _base(tiny_config, task)
    from_dict(copy.deepcopy(base))  # valid as it stands: the error below is the field's

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(value=_invalid(f, tp))
    def check(value):
        with pytest.raises(ConfigError) as info:
            from_dict(_set(base, name, value))
        message = str(info.value)
        assert name in message and "\n" not in message, message

    check()
