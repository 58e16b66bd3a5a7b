"""Compressed versions: the dtype a replica's weights are stored in (``publish_dtype``).

``fp32``: as the model holds them (a version is byte for byte what it always was).
``bf16``: every floating-point tensor as bfloat16.
``int8``: every floating-point tensor of two or more dims quantised per output channel (dim 0),
symmetric: ``scale[c] = max|w[c]| / 127``, ``q = round(w / scale[c])``, stored as ``name`` (int8)
and ``name.__scale`` (float32, shape ``[dim 0]``); a reader takes ``q · scale[c]``. Other
tensors (biases, norms, scalars, integer buffers) keep their dtype.

A version's manifest meta records its publish dtype (``publish_dtype``; absent for fp32), so a
reader knows how to decode it. Every check on a version applies to what is stored: its header
must be the stored form of the teacher's (:func:`stored_header`) and must be what its declared
publish dtype stores (:func:`check_stored`), the size bound counts stored bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .base import Header, Published

PUBLISH_DTYPES = ("fp32", "bf16", "int8")
META_KEY = "publish_dtype"
SCALE = ".__scale"  # suffix of an int8 tensor's per-channel scales
QMAX = 127
MAX_SCALE = torch.finfo(torch.float32).max / 128  # q · scale is finite for every int8 q
QUANTISE_BLOCK = 1 << 18  # elements quantised at a time

Encoder = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def check_publish_dtype(dtype: str) -> str:
    """``dtype`` if it is a publish dtype, else ValueError."""
    if dtype not in PUBLISH_DTYPES:
        raise ValueError(f"publish_dtype must be one of {list(PUBLISH_DTYPES)}, got {dtype!r}")
    return dtype


def declared(meta: Mapping[str, Any]) -> str:
    """The publish dtype a version's meta declares (fp32 when it says none); ValueError for
    one this reader does not know."""
    dtype = meta.get(META_KEY, "fp32")
    if dtype not in PUBLISH_DTYPES:
        raise ValueError(f"unknown publish dtype {dtype!r} in the manifest (known: {list(PUBLISH_DTYPES)})")
    return dtype


def tagged(meta: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``meta`` recording ``dtype`` (unchanged for fp32)."""
    return meta if dtype == "fp32" else {**meta, META_KEY: dtype}


def untagged(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` without its publish dtype (the meta of decoded weights)."""
    return {k: v for k, v in meta.items() if k != META_KEY}


def _floating(dtype: str) -> bool:
    return getattr(torch, dtype).is_floating_point


def _quantised(dtype: str, shape: tuple[int, ...]) -> bool:
    return _floating(dtype) and len(shape) >= 2


# -- encoding (the publisher) -----------------------------------------------------------
def quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``w`` (≥ 2 dims) as int8 per output channel (dim 0), symmetric,
    rounded to nearest: ``|w - q·scale[c]| ≤ scale[c] / 2``. Rows are divided in blocks of
    about ``QUANTISE_BLOCK`` elements through one reused buffer (no weight-sized temporaries)."""
    rows = w.detach().reshape(w.shape[0], math.prod(w.shape[1:]))
    q = torch.empty(rows.shape, dtype=torch.int8, device=w.device)
    if rows.numel() == 0:
        return q.reshape(w.shape), rows.new_zeros(w.shape[0], dtype=torch.float32)
    lo, hi = torch.aminmax(rows, dim=1)
    scale = torch.maximum(hi, lo.neg()).float() / QMAX
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    block = max(1, QUANTISE_BLOCK // rows.shape[1])
    buf = torch.empty(min(block, rows.shape[0]), rows.shape[1], device=w.device)
    for i in range(0, rows.shape[0], block):
        b = buf[: min(block, rows.shape[0] - i)]
        torch.div(rows[i:i + block].float(), divisor[i:i + block], out=b).round_().clamp_(-QMAX, QMAX)
        q[i:i + block].copy_(b)
    return q.reshape(w.shape), scale


def dequantise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q · scale[c]`` in float32 (see :func:`quantise`)."""
    return q.float() * scale.reshape(-1, *[1] * (q.dim() - 1))


def encode_tensor(name: str, value: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors a version of publish dtype ``dtype`` stores for the weight ``name``."""
    if dtype == "bf16" and value.is_floating_point():
        return {name: value.detach().to(torch.bfloat16)}
    if dtype != "int8":
        return {name: value}
    if name.endswith(SCALE):
        raise ValueError(f"cannot publish as int8: the weight {name!r} ends with {SCALE!r}, the suffix of "
                         "int8 scales (publish as fp32 or bf16)")
    if not (value.is_floating_point() and value.dim() >= 2):
        return {name: value}
    q, scale = quantise(value)
    return {name: q, name + SCALE: scale}


def encoder(dtype: str) -> Encoder | None:
    """``f(name, tensor) -> stored tensors`` for ``dtype`` (None for fp32: stored as held)."""
    check_publish_dtype(dtype)
    return None if dtype == "fp32" else lambda name, value: encode_tensor(name, value, dtype)


def encode(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The tensors a version of publish dtype ``dtype`` stores for ``state``."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        out.update(encode_tensor(name, value, dtype))
    return out


# -- decoding and checks (the reader) -----------------------------------------------------
def decode(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The weights a stored version holds (int8 dequantised to float32; bf16 is left for the
    teacher's load to cast into its own dtype)."""
    if dtype != "int8":
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        scale = state.get(name + SCALE)
        if not name.endswith(SCALE):
            out[name] = value if scale is None else dequantise(value, scale)
    return out


def decoded(published: Published) -> Published:
    """``published`` holding the weights its stored form decodes to (:func:`decode`, after
    :func:`check_values`), its meta without the publish dtype; ``nbytes`` still counts what was
    stored."""
    dtype = declared(published.meta)
    if dtype == "fp32":
        return published
    check_values(published.state, dtype)
    return dataclasses.replace(published, state=decode(published.state, dtype), meta=untagged(published.meta))


def stored_header(header: Header, dtype: str) -> Header:
    """The header a version of publish dtype ``dtype`` has for weights described by ``header``."""
    if dtype == "fp32":
        return dict(header)
    out: Header = {}
    for name, (dt, shape) in header.items():
        if dtype == "bf16":
            out[name] = ("bfloat16" if _floating(dt) else dt, shape)
        elif _quantised(dt, shape):
            out[name], out[name + SCALE] = ("int8", shape), ("float32", shape[:1])
        else:
            out[name] = (dt, shape)
    return out


def check_stored(header: Header, dtype: str) -> None:
    """ValueError unless the stored tensors are what publish dtype ``dtype`` stores."""
    scaled = [n for n in header if n.endswith(SCALE) and _dtype(header, n.removesuffix(SCALE)) == "int8"]
    if dtype != "int8" and scaled:
        raise ValueError(f"stores int8-quantised tensors ({scaled[0]!r}) but its manifest declares "
                         f"publish dtype {dtype}")
    if dtype == "bf16":
        _check_bf16(header)
    elif dtype == "int8":
        _check_int8(header)


def _dtype(header: Header, name: str) -> str | None:
    return header[name][0] if name in header else None


def _check_bf16(header: Header) -> None:
    for name, (dt, _) in header.items():
        if _floating(dt) and dt != "bfloat16":
            raise ValueError(f"tensor {name!r} is stored as {dt}, but its manifest declares publish dtype "
                             "bf16 (every floating-point tensor bfloat16)")


def _check_int8(header: Header) -> None:
    for name, (dt, shape) in header.items():
        if name.endswith(SCALE):
            base = header.get(name.removesuffix(SCALE), ("", ()))
            if base[0] != "int8" or len(base[1]) < 2 or (dt, shape) != ("float32", base[1][:1]):
                raise ValueError(f"int8 scale {name!r} ({dt} {list(shape)}) has no int8 tensor of ≥ 2 dims "
                                 "it scales per output channel (float32, one per row)")
        elif _quantised(dt, shape):
            raise ValueError(f"tensor {name!r} is stored as {dt}, but its manifest declares publish dtype "
                             "int8 (floating-point tensors of ≥ 2 dims as int8 with float32 scales)")


def check_values(state: Mapping[str, torch.Tensor], dtype: str) -> None:
    """ValueError for int8 scales that are negative or so large that a weight overflows."""
    if dtype != "int8":
        return
    for name, scale in state.items():
        if name.endswith(SCALE) and not bool(((scale >= 0) & (scale <= MAX_SCALE)).all()):
            raise ValueError(f"int8 scale {name!r} out of range (scales are finite, in [0, {MAX_SCALE:.3g}])")
