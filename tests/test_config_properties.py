"""Property-based config tests: every bounded or typed field, given any invalid value, gives
one ConfigError on one line that names the field (never a traceback from deeper code)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codistill.config import CodistillConfig, ConfigError, EvalConfig, OptimizerConfig, RunConfig, from_dict

SECTIONS = {"": RunConfig, "optimizer.": OptimizerConfig, "codistill.": CodistillConfig, "eval.": EvalConfig}


def _ruled_fields() -> list[tuple[str, dataclasses.Field]]:
    out = []
    for prefix, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.metadata and not dataclasses.is_dataclass(f.default):
                out.append((prefix + f.name, f))
    return out


FIELDS = _ruled_fields()


def _invalid(f: dataclasses.Field) -> st.SearchStrategy:
    """Values that break ``f``'s rules: outside its bounds or choices, non-finite, or of
    another type altogether."""
    rules, default = f.metadata, f.default
    bad: list[st.SearchStrategy] = [st.lists(st.integers(), max_size=2),
                                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)]
    if "choices" in rules:
        bad.append(st.text(max_size=8).filter(lambda v: v not in rules["choices"]))
    if isinstance(default, (int, float)) and not isinstance(default, bool):
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


@pytest.mark.parametrize("name,f", FIELDS, ids=[n for n, _ in FIELDS])
def test_every_invalid_value_is_one_line_naming_the_field(tiny_config, name, f):
    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(value=_invalid(f))
    def check(value):
        with pytest.raises(ConfigError) as info:
            from_dict(_set(tiny_config, name, value))
        message = str(info.value)
        assert name in message and "\n" not in message, message

    check()
