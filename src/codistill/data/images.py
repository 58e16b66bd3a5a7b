"""Image data: IDX files (plain or gzip), Fashion-MNIST discovery/installation, batch augmentation.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package: either installed system-wide
(``/usr/share/datasets/fashion-mnist``) or unpacked into the user's cache by the set-up step
``codistill data fashion-mnist`` (:func:`install_fashion_mnist`). Training never downloads.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import shutil
import tempfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write
from .debian import already_installed, default_cache_dir, download_deb, extract_deb, search_dirs

log = logging.getLogger(__name__)

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES: dict[str, str] = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MEAN, STD = 0.2860, 0.3530


# ---------------------------------------------------------------------------------------------- IDX


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    if path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e})") from e
    with open(path, "rb") as f:
        return f.read()


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (``.gz`` is decompressed) into an array of its dtype and shape."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX header (expected at least 4 bytes, found {len(raw)})")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad IDX magic number: found 0x{raw[:4].hex()}, "
                         "expected 0x0000 followed by a dtype code and ndim")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x} "
                         f"(known: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header (expected {header} bytes, found {len(raw)})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise ValueError(f"{path}: truncated IDX data for shape {dims}: "
                         f"expected {expected} bytes, found {found}")
    if found > expected:
        raise ValueError(f"{path}: {found - expected} trailing bytes after IDX data for shape {dims} "
                         f"(expected {expected} bytes, found {found})")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends with ``.gz``)."""
    array = np.asarray(array)
    codes = [c for c, dt in IDX_DTYPES.items()
             if dt.kind == array.dtype.kind and dt.itemsize == array.dtype.itemsize]
    if not codes:
        raise ValueError(f"{path}: dtype {array.dtype} has no IDX code")
    code, dt = codes[0], IDX_DTYPES[codes[0]]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=dt).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


# ------------------------------------------------------------------------------------ Fashion-MNIST


def _file_in(directory: str, name: str) -> str | None:
    """Path of ``name`` (or ``name`` without ``.gz``) inside ``directory``, if present."""
    for candidate in (name, name.removesuffix(".gz")):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _missing(directory: str) -> list[str]:
    return [name for name in FASHION_MNIST_FILES.values() if _file_in(directory, name) is None]


def _search_dirs() -> list[str]:
    return search_dirs("fashion-mnist", DEBIAN_DIR)


def fashion_mnist_dir(data_dir: str | None = None) -> str:
    """The directory holding the four Fashion-MNIST IDX files (``data_dir``, else the first found)."""
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"Fashion-MNIST directory not found: {data_dir}")
        missing = _missing(data_dir)
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST directory {data_dir} lacks {', '.join(missing)}")
        return data_dir
    searched = _search_dirs()
    for d in searched:
        if os.path.isdir(d) and not _missing(d):
            return d
    raise FileNotFoundError(
        f"Fashion-MNIST not found (searched {', '.join(searched)}); run `codistill data fashion-mnist` "
        f"(or `make install`), or `apt-get install {DEBIAN_PACKAGE}` as root, or set data.dir "
        "to a directory with the four IDX files"
    )


def load_fashion_mnist(data_dir: str | None = None) -> dict[str, np.ndarray]:
    """``train_x``/``test_x`` uint8 [N,28,28] and ``train_y``/``test_y`` int64 labels in 0..9."""
    d = fashion_mnist_dir(data_dir)
    paths = {key: _file_in(d, name) for key, name in FASHION_MNIST_FILES.items()}
    out: dict[str, np.ndarray] = {}
    for key, path in paths.items():
        assert path is not None
        arr = read_idx(path)
        if key.endswith("_x"):
            if arr.ndim != 3 or arr.dtype != np.uint8:
                raise ValueError(f"{path}: expected uint8 images [N,H,W], got {arr.dtype} {arr.shape}")
        else:
            if arr.ndim != 1:
                raise ValueError(f"{path}: expected 1-d labels, got shape {arr.shape}")
            if arr.size and (arr.min() < 0 or arr.max() >= len(FASHION_MNIST_CLASSES)):
                raise ValueError(f"{path}: labels must be in 0..{len(FASHION_MNIST_CLASSES) - 1}, "
                                 f"found {int(arr.min())}..{int(arr.max())}")
            arr = arr.astype(np.int64)
        out[key] = arr
    for split in ("train", "test"):
        nx, ny = len(out[f"{split}_x"]), len(out[f"{split}_y"])
        if nx != ny:
            raise ValueError(f"{paths[f'{split}_x']} has {nx} images but {paths[f'{split}_y']} "
                             f"has {ny} labels")
    if out["train_x"].shape[1:] != out["test_x"].shape[1:]:
        raise ValueError(f"{paths['train_x']} holds {out['train_x'].shape[1:]} images but "
                         f"{paths['test_x']} holds {out['test_x'].shape[1:]} images")
    return out


def _extract(deb: str, tmp: str) -> str:
    """``dpkg -x`` the package under ``tmp``; return the directory holding the four files."""
    src = os.path.join(extract_deb(deb, os.path.join(tmp, "x")), DEBIAN_DIR.lstrip("/"))
    missing = [n for n in FASHION_MNIST_FILES.values() if not os.path.isfile(os.path.join(src, n))]
    if missing:
        raise RuntimeError(f"{os.path.basename(deb)} lacks {', '.join(missing)} under {DEBIAN_DIR}")
    return src


def _place(src: str, dest: str) -> None:
    """Copy the four files from ``src`` into ``dest`` so that readers never see a partial file.

    A new ``dest`` is filled under ``dest.tmp-XXXX`` and renamed; into an existing directory
    (which may hold other files, never deleted) each file is copied to a temporary name and renamed.
    """
    names = list(FASHION_MNIST_FILES.values())
    dest = os.path.abspath(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if not os.path.exists(dest):
        staging = tempfile.mkdtemp(prefix=os.path.basename(dest) + ".tmp-", dir=os.path.dirname(dest))
        try:
            for name in names:
                shutil.copyfile(os.path.join(src, name), os.path.join(staging, name))
            os.rename(staging, dest)
            return
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not os.path.isdir(dest):  # not lost to a concurrent installer: a real error
                raise
    for name in names:
        atomic_write(os.path.join(dest, name), functools.partial(shutil.copyfile, os.path.join(src, name)))


def install_fashion_mnist(dest: str | None = None) -> str:
    """Set-up step: unpack Debian's ``dataset-fashion-mnist`` into ``dest`` (no root needed).

    Without ``dest``, returns the directory already holding the files (:func:`fashion_mnist_dir`)
    if there is one; with ``dest``, returns it at once if it holds them. Otherwise downloads the
    .deb with ``apt-get download``, extracts it with ``dpkg -x`` and copies the four files into
    ``dest`` (default ``default_cache_dir()/fashion-mnist``). Failures raise ``RuntimeError``.
    """
    dest, done = already_installed("Fashion-MNIST", dest, fashion_mnist_dir,
                                   lambda: os.path.join(default_cache_dir(), "fashion-mnist"),
                                   lambda d: os.path.isdir(d) and not _missing(d))
    if done:
        return dest
    with tempfile.TemporaryDirectory(prefix="codistill-fmnist-") as tmp:
        src = _extract(download_deb(DEBIAN_PACKAGE, tmp), tmp)
        _place(src, dest)
    log.info("Fashion-MNIST installed in %s", dest)
    return dest


# ------------------------------------------------------------------------------------------ tensors


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W] → normalised float [B,1,H,W]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}")
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def augment(
    images: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True
) -> torch.Tensor:
    """Random crop of the zero-padded images plus random horizontal flip, per example, vectorised.

    ``images`` is float [B,C,H,W]; all randomness comes from ``generator``.
    """
    if images.dim() != 4:
        raise ValueError(f"augment expects [B,C,H,W] images, got shape {tuple(images.shape)}")
    if pad < 0:
        raise ValueError(f"augment: pad must be >= 0, got {pad}")
    if pad == 0 and not flip:
        return images.clone()
    b, c, h, w = images.shape
    gdev = generator.device
    dev = images.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    padded = images
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=gdev).to(dev)
        dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=gdev).to(dev)
        rows = rows + dy
        cols = cols + dx
    if flip:
        mirror = torch.randint(0, 2, (b, 1), generator=generator, device=gdev).to(dev).bool()
        cols = torch.where(mirror, cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
