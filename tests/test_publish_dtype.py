"""Compressed versions (exchange/compression.py): ``publish_dtype`` fp32 | bf16 | int8.

Round trips through real exchanges (a DirectoryExchange in tmp_path and the in-memory one),
each within its dtype's rounding, argued; exact stored byte counts; the size bound, checksums
and header checks on what is stored; versions whose stored dtypes contradict their manifest;
a 2-replica engine run with int8 versions.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG
from numerics import U32
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from codistill.codistiller import Codistiller, TeacherSpec, Trust
from codistill.config import ConfigError, from_dict
from codistill.engine import run
from codistill.exchange import (
    DirectoryExchange,
    Exchange,
    MemoryExchange,
    Published,
    compression,
    signing,
    state_nbytes,
)
from codistill.exchange.compression import SCALE, encode
from codistill.exchange.signing import Signer, load_keys
from codistill.models import build_model
from codistill.recipes.study import arm_key
from codistill.rundir import config_changes
from codistill.runlog import read_metrics

DTYPES = ("fp32", "bf16", "int8")
SPEC = {"name": "lstm", "vocab_size": 20, "embed_dim": 8, "hidden_dim": 12}
BF16_REL = 2.0**-8  # bf16 keeps 8 significant bits: round to nearest is off by ≤ 2^-8 relative
# int8: |w/s − q| ≤ 1/2 (round to nearest) in exact arithmetic. The fp32 division w/s and the
# product q·s each round once, relative 2^-24, on values ≤ 127·s: ≤ 2·127·2^-24·s ≤ 2^-16·s more.
INT8_HALF_STEP = 0.5 + 2.0**-16


class Net(nn.Module):
    """Every kind of tensor a version holds: matrices, a 4-D kernel, biases, a norm, an int buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)
        self.register_buffer("seen", torch.tensor([3, 1, 4], dtype=torch.int64))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))


def _factory(make):
    return TeacherSpec(factory=lambda peer, meta: make())


def _stored_bytes(state: dict[str, torch.Tensor], dtype: str) -> int:
    """Tensor bytes a version of ``dtype`` stores for ``state``, from shapes alone: bf16 2 bytes
    per float; int8 1 per element of a float matrix plus a 4-byte scale per row; else as held."""
    n = 0
    for v in state.values():
        if not v.is_floating_point() or dtype == "fp32" or (dtype == "int8" and v.dim() < 2):
            n += v.numel() * v.element_size()
        elif dtype == "bf16":
            n += 2 * v.numel()
        else:
            n += v.numel() + 4 * v.shape[0]
    return n


@pytest.fixture(params=["directory", "memory"])
def exchange(request, tmp_path) -> Exchange:
    return DirectoryExchange(str(tmp_path)) if request.param == "directory" else MemoryExchange(keep=3)


def _pair(ex: Exchange, dtype: str, make=Net, **kw):
    """(a reader replica 0, a publisher replica 1 of ``dtype``, the publisher's model)."""
    torch.manual_seed(0)
    student, peer = make(), make()
    reader = Codistiller(student, ex, replica=0, num_replicas=2, teachers=_factory(make), **kw)
    publisher = Codistiller(peer, ex, replica=1, num_replicas=2, teachers=_factory(make), publish_dtype=dtype)
    return reader, publisher, peer


def _assert_within_rounding(got: torch.Tensor, w: torch.Tensor, stored: dict[str, torch.Tensor], name: str,
                            dtype: str) -> None:
    assert got.dtype == w.dtype, name  # decoded into the teacher's own dtype
    if dtype == "fp32" or not w.is_floating_point() or (dtype == "int8" and w.dim() < 2):
        assert torch.equal(got, w), name  # stored as held: exact
        assert stored[name].dtype == w.dtype, name
    elif dtype == "bf16":
        assert stored[name].dtype == torch.bfloat16, name
        assert torch.equal(got, w.bfloat16().float()), name
        assert bool(((got - w).abs() <= BF16_REL * w.abs()).all()), name
    else:
        q, scale = stored[name], stored[name + SCALE]
        assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float32, name
        rows = w.reshape(w.shape[0], -1)
        assert torch.equal(scale, rows.abs().amax(dim=1) / 127), name  # symmetric, per output channel
        err = (got - w).reshape(w.shape[0], -1).abs()
        assert bool((err <= INT8_HALF_STEP * scale.unsqueeze(1)).all()), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_version_round_trips_within_its_dtypes_rounding(exchange, dtype):
    """fp32 exact; bf16 the nearest bfloat16 (≤ 2^-8 relative); int8 ≤ half a step of its
    channel's scale; 1-D and integer tensors exact. The second version is checked against the
    built teacher's header (the first, before it is built, only against its dtype's rules)."""
    reader, publisher, peer = _pair(exchange, dtype)
    for step in (10, 20):
        torch.manual_seed(step)
        with torch.no_grad():
            for p in peer.parameters():
                p.add_(torch.randn_like(p))
        publisher.publish(step)
        assert reader.refresh(step) == {1: step}
        stored = exchange.load(1, step).state
        got = reader.teachers[1].module.state_dict()
        for name, w in peer.state_dict().items():
            _assert_within_rounding(got[name], w, stored, name, dtype)
        assert reader.teachers[1].meta.get("publish_dtype") is None  # the meta of decoded weights
    expected = 2 * _stored_bytes(peer.state_dict(), dtype)
    assert publisher.stats().bytes_published == reader.stats().bytes_read == expected
    assert reader.stats().rejected_versions == 0


def test_fp32_versions_are_the_uncompressed_files_byte_for_byte(tmp_path):
    ex = DirectoryExchange(str(tmp_path))
    _, publisher, peer = _pair(ex, "fp32")
    publisher.publish(10)
    ex.publish(1, 20, peer.state_dict(), {"replica": 1, "model": None})  # as every earlier version
    folder = tmp_path / "replica-1"
    data = (folder / f"{10:010d}.safetensors").read_bytes()
    assert data == (folder / f"{20:010d}.safetensors").read_bytes() == st_save(dict(peer.state_dict()))
    manifests = [json.loads((folder / f"{s:010d}.json").read_text()) for s in (10, 20)]
    assert manifests[0]["meta"] == manifests[1]["meta"] == {"replica": 1, "model": None}


def test_an_int8_teacher_predicts_as_its_fp32_peer(tmp_path):
    """KL(fp32 teacher ‖ int8 teacher) per example is at most B²/2, B bounding its logits'
    perturbation from the quantisation errors (≤ half a step per weight) through the two
    layers; Hoeffding's lemma gives KL(p ‖ softmax(z + δ)) = log E_p e^δ − E_p δ ≤ range(δ)²/8
    ≤ (2B)²/8. And it is far below the KL to an untrained model."""
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(10, 16, generator=g)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        return centers[y] + torch.randn(n, 16, generator=g), y

    torch.manual_seed(0)
    trained = _mlp()
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for _ in range(150):
        x, y = batch(64)
        opt.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        opt.step()
    ex = DirectoryExchange(str(tmp_path))
    reader = Codistiller(_mlp(), ex, replica=0, num_replicas=2, teachers=_factory(_mlp))
    Codistiller(trained, ex, replica=1, num_replicas=2, publish_dtype="int8").publish(10)
    assert reader.refresh(10) == {1: 10}
    x, _ = batch(512)
    with torch.no_grad():
        logp, logq = (F.log_softmax(m(x).double(), -1) for m in (trained, reader.teachers[1].module))
        untrained = F.log_softmax(_mlp()(x).double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    kl_untrained = (logp.exp() * (logp - untrained)).sum(-1)
    bound = _logit_bound(trained, ex.load(1, 10).state, x)
    assert bool((kl <= bound**2 / 2).all())
    assert float(kl.mean()) < 1e-3 * float(kl_untrained.mean()) and float(kl_untrained.mean()) > 0.5


def _logit_bound(mlp: nn.Module, stored: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per example, a bound on max_k |z'_k − z_k| of the int8 teacher's logits z' against the
    fp32 model's z. Weight errors |E| ≤ e = INT8_HALF_STEP·scale per row (biases exact):
    |Δpre| ≤ e1·‖x‖₁, ReLU is 1-Lipschitz, Δz = W2·Δh + E2·h' so |Δz| ≤ |W2|·|Δh| + e2·‖h'‖₁
    with ‖h'‖₁ ≤ ‖h‖₁ + ‖Δh‖₁. Plus both forwards' fp32 rounding: ≤ (16 + 64 + 2)·u of the
    magnitudes summed each (the int8 weights are within a step of the fp32 ones), doubled."""
    w1, b1, w2, b2 = (t.detach() for t in (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias))
    e1, e2 = (INT8_HALF_STEP * stored[f"{i}.weight{SCALE}"] for i in (0, 2))
    dh = e1 * x.abs().sum(-1, keepdim=True)
    h = torch.relu(x @ w1.T + b1)
    dz = dh @ w2.abs().T + e2 * (h.abs().sum(-1, keepdim=True) + dh.sum(-1, keepdim=True))
    magnitude = (x.abs() @ w1.abs().T + b1.abs()) @ w2.abs().T + b2.abs()
    return (dz + 2 * 2 * 82 * U32 * magnitude).amax(-1).double()


def test_stored_bytes_are_a_half_and_about_a_quarter_of_fp32(tmp_path):
    """A 512×512 layer and a norm: fp32 4·(512² + 3·512) = 1,054,720 bytes; bf16 exactly half,
    527,360; int8 512² + 4·512 (scales) + 4·3·512 (bias and norm kept) = 270,336 (0.256).
    A file is those bytes, the 8-byte header length and the JSON header."""
    model = nn.Sequential(nn.Linear(512, 512), nn.LayerNorm(512))
    sizes = {}
    for dtype in DTYPES:
        ex = DirectoryExchange(str(tmp_path / dtype))
        cd = Codistiller(model, ex, replica=1, num_replicas=2, publish_dtype=dtype)
        assert cd.publish(10) == _stored_bytes(model.state_dict(), dtype) == cd.stats().bytes_published
        data = (tmp_path / dtype / "replica-1" / f"{10:010d}.safetensors").read_bytes()
        (header,) = struct.unpack("<Q", data[:8])
        assert len(data) == 8 + header + cd.stats().bytes_published and header < 1000
        sizes[dtype] = cd.stats().bytes_published
    assert sizes == {"fp32": 1_054_720, "bf16": 527_360, "int8": 270_336}


def test_the_size_bound_applies_to_stored_bytes(tmp_path, caplog):
    """max_teacher_bytes set to the int8 version's size: it loads, an fp32 version of the same
    model (4× larger) is rejected before it is read, and a bound one byte smaller rejects it."""
    torch.manual_seed(0)
    peer = Net()
    Codistiller(peer, DirectoryExchange(str(tmp_path)), replica=1, num_replicas=2,
                publish_dtype="int8").publish(10)
    size = (tmp_path / "replica-1" / f"{10:010d}.safetensors").stat().st_size
    reader = Codistiller(Net(), DirectoryExchange(str(tmp_path)), replica=0, num_replicas=2,
                         teachers=_factory(Net), trust=Trust(max_teacher_bytes=size))
    assert reader.refresh(10) == {1: 10}
    Codistiller(peer, DirectoryExchange(str(tmp_path)), replica=1, num_replicas=2).publish(20)
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert reader.refresh(20) == {1: 10}
    assert "exceed the bound" in caplog.text
    tight = Codistiller(Net(), DirectoryExchange(str(tmp_path)), replica=0, num_replicas=2,
                        teachers=_factory(Net), trust=Trust(max_teacher_bytes=size - 1))
    assert tight.refresh(10) == {1: None}
    # In memory the bound counts the stored tensors' bytes.
    stored = _stored_bytes(peer.state_dict(), "int8")
    for bound, loaded in ((stored, 10), (stored - 1, None)):
        ex = MemoryExchange()
        reader = Codistiller(Net(), ex, replica=0, num_replicas=2, teachers=_factory(Net),
                             trust=Trust(max_teacher_bytes=bound))
        Codistiller(peer, ex, replica=1, num_replicas=2, publish_dtype="int8",
                    trust=Trust(max_teacher_bytes=bound)).publish(10)
        assert reader.refresh(10) == {1: loaded}


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_flipped_byte_of_a_compressed_version_fails_its_checksum(tmp_path, caplog, dtype):
    reader, publisher, peer = _pair(DirectoryExchange(str(tmp_path)), dtype)
    publisher.publish(10)
    assert reader.refresh(10) == {1: 10}
    publisher.publish(20)
    path = tmp_path / "replica-1" / f"{20:010d}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert reader.refresh(20) == {1: 10}
    assert "checksum mismatch" in caplog.text


def _lstm_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return build_model(SPEC).state_dict()


DECLARES = "but its manifest declares publish dtype"
CONTRADICTIONS = {  # stored as, declared, reason
    "int8 declared, fp32 stored": ("fp32", "int8", f"is stored as float32, {DECLARES} int8"),
    "fp32 declared, int8 stored": ("int8", None, "stores int8-quantised tensors"),
    "bf16 declared, fp32 stored": ("fp32", "bf16", f"is stored as float32, {DECLARES} bf16"),
    "int8 declared, bf16 stored": ("bf16", "int8", f"is stored as bfloat16, {DECLARES} int8"),
    "bf16 declared, int8 stored": ("int8", "bf16", "stores int8-quantised tensors"),
    "unknown dtype": ("int8", "int4", "unknown publish dtype 'int4'"),
}


@pytest.mark.parametrize("factory", [False, True], ids=["teacher from the spec", "caller's factory"])
@pytest.mark.parametrize("case", list(CONTRADICTIONS))
def test_a_version_whose_stored_dtypes_contradict_its_manifest_is_rejected(tmp_path, caplog, case, factory):
    """Rejected from its header, before its tensors are read, with or without a teacher header
    to compare with (a caller's factory gives none before the teacher is built)."""
    stored_as, declared, reason = CONTRADICTIONS[case]
    teachers = TeacherSpec(factory=lambda p, m: build_model(SPEC)) if factory else None
    ex = DirectoryExchange(str(tmp_path))
    reader = Codistiller(build_model(SPEC), ex, replica=0, num_replicas=2, model_spec=SPEC, teachers=teachers)
    meta = {"model": SPEC, **({"publish_dtype": declared} if declared else {})}
    ex.publish(1, 10, encode(_lstm_state(), stored_as), meta)
    read = []
    ex.store.read = lambda rel, limit, read_=ex.store.read: read.append(rel) or read_(rel, limit)
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert reader.refresh(10) == {1: None}
    assert reason in caplog.text and reader.stats().rejected_versions == 1
    assert not [r for r in read if r.endswith(".safetensors")]


@pytest.mark.parametrize("scale", [1e37, -1.0, float("nan")])
def test_int8_scales_that_overflow_or_are_negative_are_rejected(tmp_path, caplog, scale):
    reader, publisher, peer = _pair(DirectoryExchange(str(tmp_path)), "int8")
    publisher.publish(10)
    assert reader.refresh(10) == {1: 10}
    stored = encode(peer.state_dict(), "int8")
    stored["fc.weight" + SCALE][3] = scale
    DirectoryExchange(str(tmp_path)).publish(1, 20, stored, {"publish_dtype": "int8"})
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert reader.refresh(20) == {1: 10}
    assert "out of range" in caplog.text or "non-finite" in caplog.text
    assert torch.isfinite(reader.teachers[1].module.fc.weight).all()


def test_a_prefetched_int8_version_is_decoded_off_the_training_step(tmp_path, monkeypatch):
    """The prefetch thread hands the refresh a decoded version (float32 weights, no scales, the
    stored bytes still counted): the refresh itself dequantises nothing."""
    reader, publisher, peer = _pair(DirectoryExchange(str(tmp_path)), "int8")
    publisher.publish(10)
    assert reader.refresh(10) == {1: 10}  # read on the step; starts the prefetch thread
    with torch.no_grad():
        for p in peer.parameters():
            p.mul_(1.5)
    publisher.publish(20)
    stored = encode(peer.state_dict(), "int8")
    prefetcher = reader.picker.prefetcher
    deadline = time.monotonic() + 60
    while prefetcher._ready.get(1) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ready = prefetcher._ready[1]
    assert ready.step == 20 and "publish_dtype" not in ready.meta
    assert ready.state.keys() == peer.state_dict().keys()
    assert ready.nbytes == _stored_bytes(peer.state_dict(), "int8") == state_nbytes(stored)

    def no_decoding(*args, **kwargs):
        raise AssertionError("dequantised on the training step")

    monkeypatch.setattr(compression, "dequantise", no_decoding)
    assert reader.refresh(20) == {1: 20}
    teacher = reader.teachers[1].module.state_dict()
    for name, w in peer.state_dict().items():
        _assert_within_rounding(teacher[name], w, stored, name, "int8")
    assert reader.stats().bytes_read == 2 * ready.nbytes


@pytest.mark.parametrize("scale", [-1.0, float("nan")])
def test_decoding_checks_the_int8_scales_first(scale):
    stored = encode(_mlp().state_dict(), "int8")
    stored["0.weight" + SCALE][0] = scale
    with pytest.raises(ValueError, match="out of range"):
        compression.decoded(Published(1, 10, stored, {"publish_dtype": "int8"}))


@pytest.mark.parametrize("shape, dtype", [((1001, 1000), torch.float32), ((300, 4, 3, 3), torch.float32),
                                          ((64, 64), torch.bfloat16), ((64, 64), torch.float64),
                                          ((0, 5), torch.float32), ((5, 0), torch.float32)])
def test_blockwise_quantisation_equals_the_whole_tensor_formula(shape, dtype):
    """Blocks of QUANTISE_BLOCK elements (1001 rows of 1000: 262 rows a block, the last one
    short) give bit for bit round(w / scale) over the whole tensor in float32; a zero row has
    scale 0 and q 0; an empty weight gives empty q and scales."""
    torch.manual_seed(0)
    w = torch.randn(shape).to(dtype)
    if w.numel():
        w[1] = 0
    q, scale = compression.quantise(w)
    rows = w.float().reshape(shape[0], math.prod(shape[1:]))
    want_scale = rows.abs().amax(dim=1) / 127 if rows.numel() else torch.zeros(shape[0])
    divisor = torch.where(want_scale > 0, want_scale, torch.ones_like(want_scale)).unsqueeze(1)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float32
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.reshape(rows.shape), torch.round(rows / divisor).clamp(-127, 127).to(torch.int8))


def test_a_signed_int8_versions_declared_dtype_cannot_be_altered(tmp_path, caplog):
    key = "11" * 32

    def exchange() -> DirectoryExchange:
        ex = DirectoryExchange(str(tmp_path))
        signing.attach(ex, Signer(load_keys(key), "run-a"))
        return ex

    ex = exchange()
    Codistiller(_mlp(), ex, replica=1, num_replicas=2, publish_dtype="int8").publish(10)
    path = tmp_path / "replica-1" / f"{10:010d}.json"
    manifest = json.loads(path.read_text())
    assert manifest["meta"]["publish_dtype"] == "int8"
    manifest["meta"]["publish_dtype"] = "bf16"
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert exchange().load(1, 10) is None
    assert "bad signature" in caplog.text


def test_publish_dtype_is_checked_and_its_default_keeps_arm_keys_and_resumes():
    with pytest.raises(ValueError, match="publish_dtype must be one of"):
        Codistiller(_mlp(), MemoryExchange(), publish_dtype="int4")
    with pytest.raises(ConfigError, match="codistill.publish_dtype"):
        from_dict({**TINY_CONFIG, "codistill": {"publish_dtype": "int4"}})
    cfg = from_dict(TINY_CONFIG)
    assert cfg.codistill.publish_dtype == "fp32"
    assert arm_key(cfg) == "a9eb175057"  # the key before publish_dtype existed
    int8 = cfg.to_dict()
    int8["codistill"]["publish_dtype"] = "int8"
    assert arm_key(from_dict(int8)) != arm_key(cfg)
    older = cfg.to_dict()
    del older["codistill"]["publish_dtype"]  # a run directory written before the field existed
    assert config_changes(older, cfg.to_dict()) == {}
    assert config_changes(older, int8) == {"codistill.publish_dtype": (None, "int8")}


def test_a_two_replica_run_with_int8_versions_trains_and_loads_teachers(tiny_config_factory, tmp_path):
    values = tiny_config_factory()
    values["codistill"] = {**values["codistill"], "publish_dtype": "int8", "exchange": str(tmp_path / "ex")}
    run(from_dict(values), str(tmp_path / "run"), progress=False)
    rows = read_metrics(str(tmp_path / "run"))
    for r in (0, 1):
        train = [row for row in rows if row["kind"] == "train" and row["replica"] == r]
        assert all(row["staleness_max"] is not None and row["distill_loss"] > 0 for row in train[2:])
        assert all(torch.isfinite(torch.tensor(row["loss"])) for row in train)
        weights = load_file(str(tmp_path / "run" / f"replica-{r}" / "model.safetensors"))
        # An LSTM of 256 tokens, embedding 16, hidden 32: matrices of 256·16, 128·16, 128·32 and
        # 256·32 elements (4·18,432 bytes in fp32), 768 scale rows and 512 bias elements.
        assert (state_nbytes(weights), _stored_bytes(weights, "int8")) == (75_776, 18_432 + 4 * 768 + 4 * 512)
        versions = 5  # published at 10, 15, 20, 25, 30: each read once by the peer
        assert train[-1]["bytes_published"] == train[-1]["bytes_read"] == versions * 23_552
        manifest = json.loads(max((tmp_path / "ex" / f"replica-{r}").glob("*.json")).read_text())
        assert manifest["meta"]["publish_dtype"] == "int8"
        stored = load_file(str(Path(tmp_path / "ex" / f"replica-{r}" / manifest["weights"])))
        assert {v.dtype for k, v in stored.items() if not k.endswith(SCALE)} == {torch.int8, torch.float32}
