"""Directory / object-store exchange: safetensors weights plus a JSON manifest per version.

Layout under the root::

    replica-0/0000000050.safetensors   weights
    replica-0/0000000050.json          manifest: step, sha256 and size of the weights, model

The manifest is written last, so its presence marks a complete version. On a local
filesystem both files are written to a hidden temporary name, fsynced and renamed, so a
reader never sees a half-written file. Readers verify the checksum and skip a version that
fails it, falling back to the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .base import Exchange, Published

log = logging.getLogger(__name__)

FORMAT = "codistill-exchange/1"


def _version_name(step: int) -> str:
    return f"{step:010d}"


class _LocalStore:
    """Atomic writes on a POSIX filesystem: temporary name, fsync, rename, fsync the folder."""

    def __init__(self, root: str) -> None:
        self.root = root

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
    """Any fsspec filesystem (s3://, gs://, memory://, ...): whole-object puts, manifest last."""

    def __init__(self, url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def write(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def list(self, rel: str) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(rel), detail=False)]
        except FileNotFoundError:
            return []

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._path(rel))
        except FileNotFoundError:
            pass


def _make_store(location: str) -> _LocalStore | _FsspecStore:
    if location.startswith("file://"):
        return _LocalStore(location[len("file://") :])
    if "://" in location:
        return _FsspecStore(location)
    return _LocalStore(location)


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
        data = st_save({k: v.detach().cpu().contiguous() for k, v in state.items()})
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

    def load(self, replica: int, step: int) -> Published | None:
        folder, name = self._folder(replica), _version_name(step)
        where = f"{self.location}/{folder}/{name}"
        try:
            manifest = json.loads(self.store.read(f"{folder}/{name}.json"))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
                    or manifest.get("step") != step:
                raise ValueError(f"not a {FORMAT} manifest for step {step}")
            weights, expected = manifest["weights"], manifest["sha256"]
            meta = manifest.get("meta", {})
            if not isinstance(weights, str) or not isinstance(expected, str) or not isinstance(meta, dict):
                raise ValueError("weights, sha256 or meta has the wrong type")
            if "/" in weights or "\\" in weights or weights.startswith("."):
                raise ValueError(f"weights file name {weights!r} leaves the replica folder")
            data = self.store.read(f"{folder}/{weights}")
        except FileNotFoundError:
            log.debug("version %s vanished while reading (pruned)", where)
            return None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("skipping %s.json: bad manifest (%s)", where, e)
            return None
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected or len(data) != manifest.get("nbytes", len(data)):
            log.warning("skipping %s.safetensors: checksum mismatch (corrupted file)", where)
            return None
        try:
            state = st_load(data)
        except Exception as e:  # safetensors raises its own error types
            log.warning("skipping %s.safetensors: unreadable (%s)", where, e)
            return None
        return Published(replica, step, state, meta, len(data))
