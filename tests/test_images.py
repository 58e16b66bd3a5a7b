"""IDX reading, Fashion-MNIST discovery/loading, batch augmentation and the vision models."""

from __future__ import annotations

import copy
import gzip
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import U32

from codistill.data import debian, images
from codistill.data.images import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    augment,
    fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
    to_float,
    write_idx,
)
from codistill.models.vision import ResNet, SmallCNN

torch.set_num_threads(1)


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(5, 4, 3), (7,)])
def test_idx_round_trip(tmp_path, suffix, shape):
    arr = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = str(tmp_path / f"a-idx{suffix}")
    write_idx(path, arr)
    if suffix:
        with open(path, "rb") as f:
            assert f.read(2) == b"\x1f\x8b"  # really gzip
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, arr)


def test_idx_big_endian_dtypes(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "f.idx"
    path.write_bytes(_idx_bytes(arr.astype(">f4"), code=0x0D))
    out = read_idx(str(path))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "data, pattern",
    [
        (b"\x01\x02\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "magic"),
        (b"\x00\x00\x42\x01" + b"\x00\x00\x00\x01" + b"\x05", "dtype code"),
        (_idx_bytes(np.zeros((3, 2), np.uint8))[:-2], "truncated.*expected 6 bytes, found 4"),
        (_idx_bytes(np.zeros((3, 2), np.uint8)) + b"xy", "trailing"),
    ],
    ids=["magic", "dtype", "truncated", "trailing"],
)
@pytest.mark.parametrize("gz", [False, True])
def test_idx_bad_files(tmp_path, data, pattern, gz):
    path = tmp_path / ("bad-file.gz" if gz else "bad-file")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=pattern) as e:
        read_idx(str(path))
    assert str(path) in str(e.value)


def test_idx_not_gzip_and_missing(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match="gzip") as e:
        read_idx(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------ Fashion-MNIST


def _fake_set(d, n_train: int = 12, n_test: int = 5, gz: bool = True, labels_max: int = 9) -> str:
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, labels_max + 1, n_train).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, labels_max + 1, n_test).astype(np.uint8),
    }
    arrays["train_y"][0] = labels_max
    for key, name in FASHION_MNIST_FILES.items():
        write_idx(os.path.join(d, name if gz else name.removesuffix(".gz")), arrays[key])
    return str(d)


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """Nowhere to find Fashion-MNIST: empty HOME/XDG cache, no CODISTILL_DATA, no Debian dir."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CODISTILL_DATA", raising=False)
    monkeypatch.setattr(images, "DEBIAN_DIR", str(tmp_path / "debian"))
    return tmp_path


def test_explicit_dir_missing_file(tmp_path):
    d = _fake_set(tmp_path / "fm")
    os.remove(os.path.join(d, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as e:
        fashion_mnist_dir(d)
    assert d in str(e.value)


def test_nothing_found(no_data):
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist_dir()
    msg = str(e.value)
    assert "codistill data fashion-mnist" in msg and "data.dir" in msg


def test_search_order(no_data, monkeypatch):
    assert images.default_cache_dir() == str(no_data / "cache" / "codistill")
    deb = _fake_set(no_data / "debian")
    assert fashion_mnist_dir() == deb
    cache = _fake_set(no_data / "cache" / "codistill" / "fashion-mnist", gz=False)
    assert fashion_mnist_dir() == cache
    _fake_set(no_data / "env" / "fashion-mnist")
    monkeypatch.setenv("CODISTILL_DATA", str(no_data / "env"))
    assert fashion_mnist_dir() == str(no_data / "env" / "fashion-mnist")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert images.default_cache_dir() == str(no_data / "home" / ".cache" / "codistill")


def test_install_returns_existing(no_data):
    d = _fake_set(no_data / "given")
    assert images.install_fashion_mnist(d) == d  # complete: no apt-get


def _fake_run(returncodes, calls):
    """A stand-in for ``debian._run``: pops exit codes, records commands, writes nothing."""
    import subprocess

    def run(cmd, cwd):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncodes.pop(0), "", "E: Unable to locate package\n")

    return run


@pytest.mark.parametrize("root", [False, True])
def test_install_apt_failure(no_data, monkeypatch, root):
    calls = []
    monkeypatch.setattr(debian, "_run", _fake_run([100, 0, 100], calls))
    monkeypatch.setattr(debian.os, "geteuid", lambda: 0 if root else 1000)
    with pytest.raises(RuntimeError, match="apt-get download dataset-fashion-mnist.*exit 100.*Unable to"):
        images.install_fashion_mnist(str(no_data / "dest"))
    expected = [["apt-get", "download", images.DEBIAN_PACKAGE]]
    if root:  # one `apt-get update`, then one retry
        expected += [["apt-get", "update"], ["apt-get", "download", images.DEBIAN_PACKAGE]]
    assert calls == expected
    assert not (no_data / "dest").exists()


def test_install_no_deb(no_data, monkeypatch):
    monkeypatch.setattr(debian, "_run", _fake_run([0], []))
    with pytest.raises(RuntimeError, match="produced no dataset-fashion-mnist_"):
        images.install_fashion_mnist(str(no_data / "dest"))


def test_place_new_and_existing_dir(tmp_path):
    src = _fake_set(tmp_path / "src")
    dest = tmp_path / "cache" / "fashion-mnist"
    images._place(src, str(dest))
    assert sorted(os.listdir(dest)) == sorted(FASHION_MNIST_FILES.values())
    assert not [p for p in os.listdir(dest.parent) if ".tmp-" in p]
    copied, original = load_fashion_mnist(str(dest)), load_fashion_mnist(src)
    np.testing.assert_array_equal(copied["train_x"], original["train_x"])
    other = tmp_path / "mine"  # an existing directory with other files: they stay
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    (other / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
    images._place(src, str(other))
    assert (other / "notes.txt").read_text() == "keep"
    assert sorted(os.listdir(other)) == sorted([*FASHION_MNIST_FILES.values(), "notes.txt"])
    assert load_fashion_mnist(str(other))["train_x"].shape == (12, 28, 28)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fake_set(tmp_path, gz):
    d = _fake_set(tmp_path / "fm", gz=gz)
    data = load_fashion_mnist(d)
    assert data["train_x"].shape == (12, 28, 28) and data["train_x"].dtype == np.uint8
    assert data["test_x"].shape == (5, 28, 28)
    assert data["train_y"].dtype == np.int64 and data["test_y"].shape == (5,)
    x = to_float(torch.from_numpy(data["train_x"]))
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    ref = (data["train_x"][3, 5, 7] / 255 - 0.2860) / 0.3530
    # fp32: x/255 (≤ u), the mean and std rounded to fp32 and the subtraction (≤ u each, of
    # quantities ≤ 1), then the division by 0.353 (those / 0.353, plus 2u·|ref|). Doubled.
    assert x[3, 0, 5, 7].item() == pytest.approx(ref, abs=2 * U32 * (3 / 0.3530 + 2 * abs(ref)))
    with pytest.raises(ValueError, match="uint8"):
        to_float(x[:, 0])


def test_load_mismatched_counts_and_bad_labels(tmp_path):
    d = _fake_set(tmp_path / "fm")
    write_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="t10k-images.*5 images.*t10k-labels.*4 labels"):
        load_fashion_mnist(d)
    d = _fake_set(tmp_path / "fm2", labels_max=10)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*0..9"):
        load_fashion_mnist(d)
    d = _fake_set(tmp_path / "fm3")
    write_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"), np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"train-images.*\(28, 28\).*t10k-images.*\(32, 32\)"):
        load_fashion_mnist(d)


def test_real_fashion_mnist():
    try:
        d = fashion_mnist_dir()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (codistill data fashion-mnist)")
    data = load_fashion_mnist(d)
    assert data["train_x"].shape == (60000, 28, 28) and data["test_x"].shape == (10000, 28, 28)
    assert len(data["train_y"]) == 60000 and len(data["test_y"]) == 10000
    assert set(np.unique(data["train_y"])) == set(range(10)) == set(np.unique(data["test_y"]))
    assert len(FASHION_MNIST_CLASSES) == 10


# ------------------------------------------------------------------------------------------ augment


def _batch(b: int = 16, c: int = 2, h: int = 9, w: int = 7) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(5))


def test_augment_identity():
    x = _batch()
    out = augment(x, torch.Generator().manual_seed(0), pad=0, flip=False)
    assert torch.equal(out, x)


def test_augment_flip_only():
    x = _batch(b=64)
    out = augment(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)


@pytest.mark.parametrize("flip", [False, True])
def test_augment_crop(flip):
    pad, x = 2, _batch(b=32)
    _, _, h, w = x.shape
    out = augment(x, torch.Generator().manual_seed(1), pad=pad, flip=flip)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (pad,) * 4)
    offsets = set()
    for o, p in zip(out, padded):
        hits = [(dy, dx, m) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for m in (False, True)
                if torch.equal(o, (lambda c: c.flip(-1) if m else c)(p[:, dy:dy + h, dx:dx + w]))]
        assert hits, "output is not a crop of the padded input"
        assert flip or not all(m for _, _, m in hits)
        offsets.add(hits[0][:2])
    assert len(offsets) > 3  # per-example offsets


def test_augment_uint8_and_bad_input():
    x = torch.randint(0, 256, (8, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = augment(x, torch.Generator().manual_seed(0), pad=1)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    with pytest.raises(ValueError, match="pad"):
        augment(x, torch.Generator(), pad=-1)
    with pytest.raises(ValueError, match=r"\[B,C,H,W\]"):
        augment(x[:, 0], torch.Generator())


def test_augment_reproducible():
    x = _batch()
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("cls, kwargs", [
    (SmallCNN, {"width": 8, "hidden": 16, "dropout": 0.1}),
    (ResNet, {"width": 4, "blocks": 1}),
])
@pytest.mark.parametrize("size", [28, 8, 13])
def test_model_shapes_and_grads(cls, kwargs, size):
    torch.manual_seed(0)
    model = cls(num_classes=7, in_channels=3, **kwargs)
    x = torch.randn(5, 3, size, size)
    logits = model(x)
    assert logits.shape == (5, 7)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_resnet_state_dict_carries_batchnorm():
    torch.manual_seed(0)
    a = ResNet(width=4, blocks=2)
    x = torch.randn(8, 1, 28, 28)
    a.train()
    for _ in range(3):  # move the running statistics away from their initial values
        a(x + torch.randn_like(x))
    sd = a.state_dict()
    assert any(k.endswith("running_mean") for k in sd) and any(k.endswith("running_var") for k in sd)
    assert any(k.endswith("running_mean") and v.abs().sum() > 0 for k, v in sd.items())
    torch.manual_seed(1)
    b = ResNet(width=4, blocks=2)
    b.load_state_dict(copy.deepcopy(sd))
    a.eval()
    b.eval()
    with torch.no_grad():
        ea, eb = a(x), b(x)
        assert torch.equal(ea, eb)
        b.train()
        tb = b(x)
    assert not torch.allclose(tb, eb)
