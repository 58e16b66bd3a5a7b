"""Directory / object-store exchange: safetensors weights plus a JSON manifest per version.

Layout under the root::

    replica-0/0000000050.safetensors   weights
    replica-0/0000000050.json          manifest: step, sha256 and size of the weights, model

The manifest is written last, so its presence marks a complete version. On a local
filesystem both files are written to a hidden temporary name, fsynced and renamed, so a
reader never sees a half-written file.

Everything in the exchange is untrusted input (other jobs can write there). A reader checks,
in this order and before reading more: the manifest's size and fields; the declared and
actual size of the weights against ``max_bytes``; the safetensors header (every tensor's
dtype, shape and byte range) and the caller's ``check`` of it; then the whole file's
checksum. A version that fails is skipped (warned about once, never read again) and the
previous one is used. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import uuid
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .base import Check, Exchange, Header, Published, tensor_nbytes
from .signing import signer_of

log = logging.getLogger(__name__)

FORMAT = "codistill-exchange/1"
MAX_MANIFEST_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _version_name(step: int) -> str:
    return f"{step:010d}"


class _LocalStore:
    """Atomic writes on a POSIX filesystem: temporary name, fsync, rename, fsync the folder."""

    def __init__(self, root: str) -> None:
        self.root = root
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise ValueError(f"exchange {root!r} is not a usable directory: {e}") from e
        if not os.access(root, os.W_OK | os.X_OK):
            raise ValueError(f"exchange {root!r} is not writable")

    def write(self, rel: str, data: bytes) -> None:
        path = os.path.join(self.root, rel)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, rel: str) -> bytes:
        with open(os.path.join(self.root, rel), "rb") as f:
            return f.read()

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        with open(os.path.join(self.root, rel), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def size(self, rel: str) -> int:
        return os.path.getsize(os.path.join(self.root, rel))

    def list(self, rel: str) -> list[str]:
        try:
            return os.listdir(os.path.join(self.root, rel))
        except FileNotFoundError:
            return []

    def remove(self, rel: str) -> None:
        try:
            os.remove(os.path.join(self.root, rel))
        except FileNotFoundError:
            pass


class _FsspecStore:
    """Any fsspec filesystem (s3://, gs://, memory://, ...): whole-object puts, manifest last.
    Transient errors are retried with exponential backoff (``RETRIES`` times)."""

    RETRIES, BACKOFF = 3, 0.2  # seconds before the first retry; doubled each time

    def __init__(self, url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def _retry(self, fn: Any, *args: Any, **kw: Any) -> Any:
        for attempt in range(self.RETRIES + 1):
            try:
                return fn(*args, **kw)
            except FileNotFoundError:
                raise
            except (OSError, ConnectionError, TimeoutError) as e:
                if attempt == self.RETRIES:
                    raise
                delay = self.BACKOFF * 2**attempt
                log.debug("exchange: %s failed (%s); retrying in %.1fs", fn.__name__, e, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def write(self, rel: str, data: bytes) -> None:
        self._retry(self.fs.pipe_file, self._path(rel), data)

    def read(self, rel: str) -> bytes:
        return self._retry(self.fs.cat_file, self._path(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self._retry(self.fs.cat_file, self._path(rel), start=start, end=end)

    def size(self, rel: str) -> int:
        return int(self._retry(self.fs.size, self._path(rel)))

    def list(self, rel: str) -> list[str]:
        try:
            paths = self._retry(self.fs.ls, self._path(rel), detail=False)
        except FileNotFoundError:
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]

    def remove(self, rel: str) -> None:
        try:
            self._retry(self.fs.rm_file, self._path(rel))
        except FileNotFoundError:
            pass


def _make_store(location: str) -> _LocalStore | _FsspecStore:
    if location.startswith("file://"):
        return _LocalStore(location[len("file://") :])
    if "://" in location:
        return _FsspecStore(location)
    return _LocalStore(location)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own memory (safetensors refuses tied weights,
    e.g. a language model's embedding shared with its output layer)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


class DirectoryExchange(Exchange):
    """Exchange through a directory or an fsspec URL; keeps the newest ``keep`` versions."""

    def __init__(self, location: str, keep: int = 3) -> None:
        if keep < 2:
            # A reader may be loading the previous version while a new one lands.
            raise ValueError(f"keep must be >= 2 for a directory exchange, got {keep}")
        self.location = location
        self.keep = keep
        self.store = _make_store(location)

    @staticmethod
    def _folder(replica: int) -> str:
        return f"replica-{replica}"

    def publish(
        self, replica: int, step: int, state: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> int:
        folder, name = self._folder(replica), _version_name(step)
        data = st_save(_unshared(state))
        manifest = {
            "format": FORMAT,
            "replica": replica,
            "step": step,
            "weights": f"{name}.safetensors",
            "sha256": hashlib.sha256(data).hexdigest(),
            "nbytes": len(data),
            "time": time.time(),
            "meta": meta,
        }
        signer_of(self).sign(manifest)  # run_id; with a key, kid and hmac (signing.py)
        self.store.write(f"{folder}/{name}.safetensors", data)
        self.store.write(f"{folder}/{name}.json", json.dumps(manifest, indent=1).encode())
        self._prune(replica)
        return len(data)

    def _prune(self, replica: int) -> None:
        folder = self._folder(replica)
        for step in self.versions(replica)[: -self.keep]:
            name = _version_name(step)
            self.store.remove(f"{folder}/{name}.json")
            self.store.remove(f"{folder}/{name}.safetensors")

    def clear(self, replica: int) -> None:
        folder = self._folder(replica)
        for step in self.versions(replica):
            name = _version_name(step)
            self.store.remove(f"{folder}/{name}.json")  # manifest first: never a half version
            self.store.remove(f"{folder}/{name}.safetensors")

    def versions(self, replica: int) -> list[int]:
        steps = []
        for fname in self.store.list(self._folder(replica)):
            stem, dot, ext = fname.partition(".")
            if ext == "json" and stem.isdigit():
                steps.append(int(stem))
        return sorted(steps)

    def load(self, replica: int, step: int, check: Check | None = None) -> Published | None:
        folder, name = self._folder(replica), _version_name(step)
        where = f"{self.location}/{folder}/{name}"
        try:
            size = self.store.size(f"{folder}/{name}.json")
            if size > MAX_MANIFEST_BYTES:
                self._refuse((replica, step, "manifest", size), f"{where}.json",
                             f"manifest of {size} bytes (more than {MAX_MANIFEST_BYTES})")
                return None
            manifest = self.store.read(f"{folder}/{name}.json")
        except FileNotFoundError:
            log.debug("version %s vanished while reading (pruned)", where)
            return None
        key = (replica, step, hashlib.sha256(manifest).hexdigest())
        if self._refused(key):
            return None
        try:
            weights, expected, nbytes, meta = self._parse_manifest(manifest, step)
            if not signer_of(self).admit(json.loads(manifest), replica, step, where):  # signing.py
                return None
            rel = f"{folder}/{weights}"
            actual = self.store.size(rel)
            if self.max_bytes is not None and max(nbytes, actual) > self.max_bytes:
                raise ValueError(f"weights of {max(nbytes, actual)} bytes exceed the bound of "
                                 f"{self.max_bytes}")
            if actual != nbytes:
                raise ValueError(f"weights file has {actual} bytes, the manifest says {nbytes}")
            header = self._read_header(rel, nbytes)
            if check is not None:
                check(header, meta)
            data = self.store.read(rel)
        except FileNotFoundError:
            log.debug("version %s vanished while reading (pruned)", where)
            return None
        except (ValueError, KeyError, TypeError, struct.error) as e:
            self._refuse(key, f"{where}", str(e))
            return None
        if hashlib.sha256(data).hexdigest() != expected or len(data) != nbytes:
            self._refuse(key, f"{where}.safetensors", "checksum mismatch (corrupted or replaced file)")
            return None
        try:
            state = st_load(data)
        except Exception as e:  # safetensors raises its own error types
            self._refuse(key, f"{where}.safetensors", f"unreadable ({e})")
            return None
        return Published(replica, step, state, meta, len(data), expected)

    def ident(self, replica: int, step: int) -> str | None:
        """The weights' sha256 from the version's manifest (None if missing or unusable)."""
        rel = f"{self._folder(replica)}/{_version_name(step)}.json"
        try:
            if self.store.size(rel) > MAX_MANIFEST_BYTES:
                return None
            return self._parse_manifest(self.store.read(rel), step)[1]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _parse_manifest(raw: bytes, step: int) -> tuple[str, str, int, dict[str, Any]]:
        """(weights file name, sha256, size, meta) of a manifest, or ValueError."""
        manifest = json.loads(raw)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("step") != step:
            raise ValueError(f"bad manifest: not a {FORMAT} manifest for step {step}")
        weights, expected, nbytes = manifest["weights"], manifest["sha256"], manifest.get("nbytes")
        meta = manifest.get("meta", {})
        if not isinstance(weights, str) or not isinstance(expected, str) or not isinstance(meta, dict) \
                or not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 8:
            raise ValueError("bad manifest: weights, sha256, nbytes or meta has the wrong type")
        if "/" in weights or "\\" in weights or weights.startswith("."):
            raise ValueError(f"bad manifest: weights file name {weights!r} leaves the replica folder")
        return weights, expected, nbytes, meta

    def _read_header(self, rel: str, nbytes: int) -> Header:
        """The tensors a safetensors file declares, checked to cover the file exactly."""
        (n,) = struct.unpack("<Q", self.store.read_range(rel, 0, 8))
        if n > min(MAX_HEADER_BYTES, nbytes - 8):
            raise ValueError(f"safetensors header of {n} bytes in a file of {nbytes}")
        raw = json.loads(self.store.read_range(rel, 8, 8 + n))
        if not isinstance(raw, dict):
            raise ValueError("safetensors header is not a mapping")
        header: Header = {}
        spans = []
        for name, entry in raw.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= start <= end:
                raise ValueError(f"tensor {name!r}: bad shape or offsets in the safetensors header")
            header[name] = (dtype, tuple(shape))
            if end - start != tensor_nbytes(dtype, shape):
                raise ValueError(f"tensor {name!r}: {end - start} bytes for shape {shape} of {dtype}")
            spans.append((start, end))
        covered = 0
        for start, end in sorted(spans):
            if start != covered:
                raise ValueError("safetensors tensors overlap or leave gaps")
            covered = end
        if 8 + n + covered != nbytes:
            raise ValueError(f"safetensors header describes {8 + n + covered} bytes, the file has {nbytes}")
        return header
