"""Directory / object-store exchange: safetensors weights plus a JSON manifest per version.

Layout under the root::

    replica-0/0000000050.safetensors   weights
    replica-0/0000000050.json          manifest: step, sha256 and size of the weights, model

The manifest is written last, so its presence marks a complete version. On a local
filesystem both files are written to a hidden temporary name, fsynced and renamed, so a
reader never sees a half-written file; an object store's PUT is atomic, and listings and
sizes are read from the store itself, never from a client's cache (docs/object-store.md).
A publisher keeps its newest ``keep`` versions up to the step it publishes and removes any
after it (not its own: planted, or lost in a crash before a resume); on a full disk it
removes all but its newest complete version and writes once more.

Everything in the exchange is untrusted input (other jobs can write there). Only names of
the form publish writes (ten ASCII digits) are versions. A reader reads only regular files:
on a local filesystem every path component is checked with lstat and opened with
``O_NOFOLLOW | O_NONBLOCK`` (no symlink, FIFO, device or folder is followed or read), the
opened file checked again with fstat; an object store's entry must be a file. Every read is
bounded before it starts (at most the bound + 1 bytes, whatever the file claims or however
it grows), and JSON nested deeper than ``MAX_DEPTH`` is refused before it is parsed. In
order and before reading more, a reader checks: the manifest's size and fields; the declared
and actual size of the weights against ``max_bytes``; the safetensors header (every
tensor's dtype, shape and byte range) and the caller's ``check`` of it; then the whole
file's checksum. A version that fails in any way is skipped (warned about once, counted,
never read again unless written again) and the previous one is used; one that an object
store failed to serve (after its retries) is only skipped for that refresh. Nothing is ever
unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import struct
import time
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .._extras import require
from ..files import atomic_write
from .base import Check, Exchange, Header, Published, tensor_nbytes
from .signing import signer_of

log = logging.getLogger(__name__)

FORMAT = "codistill-exchange/1"
MAX_MANIFEST_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_DEPTH = 16  # JSON nesting: a manifest (its meta's model spec) and a safetensors header are shallow
OBJECT_STORE_POLL = 1.0  # seconds between a prefetcher's listings of a peer (each a LIST request)
PROTOCOL_MODULES = {"s3": "s3fs", "s3a": "s3fs"}  # a URL scheme -> the extra's module serving it
SAFETENSORS_DTYPES = {  # a safetensors header's dtype code -> torch's dtype name
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _version_name(step: int) -> str:
    return f"{step:010d}"


_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = {stat.S_IFLNK: "a symlink", stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a folder",
          stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, refused (ValueError) when nested deeper than ``MAX_DEPTH``: the depth
    is measured before parsing (brackets outside strings, counted in one vectorised pass), so
    the parser never recurses deeper than that."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads decodes bytes
    brackets = _STRING.sub("", text).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    if len(brackets) > 2 * MAX_DEPTH:  # shallow and short needs no count
        steps = torch.frombuffer(bytearray(brackets), dtype=torch.uint8)
        opens = (steps == ord("[")) | (steps == ord("{"))
        depth = int((opens.to(torch.int32) * 2 - 1).cumsum(0, dtype=torch.int32).max())
    else:
        depth = level = 0
        for c in brackets:
            level += 1 if c in b"[{" else -1
            depth = max(depth, level)
    if depth > MAX_DEPTH:
        raise ValueError(f"JSON nested {depth} deep (more than {MAX_DEPTH})")
    return json.loads(text)


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
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, data)

    def _open(self, rel: str) -> tuple[int, int]:
        """(an fd, the size) of the regular file ``rel``; ValueError if it is anything else (a
        symlink, FIFO, device or folder), at any level below the root. Nothing blocks: a FIFO
        is refused from its lstat before it is opened, and O_NONBLOCK covers a swap in between."""
        *folders, name = rel.split("/")
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate([*folders, name]):
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                last = i == len(folders)
                if not (stat.S_ISREG(st.st_mode) if last else stat.S_ISDIR(st.st_mode)):
                    raise ValueError(f"{rel} is not a regular file in the exchange "
                                     f"({part!r}: {_KINDS.get(stat.S_IFMT(st.st_mode), 'other')})")
                flags = _READ if last else os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd, parent = os.open(part, flags, dir_fd=fd), fd
                os.close(parent)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped since the lstat
                raise ValueError(f"{rel} is not a regular file in the exchange")
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def read(self, rel: str, limit: int) -> bytes:
        """The whole regular file ``rel``; ValueError if it has more than ``limit`` bytes (at
        most ``limit`` + 1 are read, whatever its size claims or however it grows)."""
        fd, size = self._open(rel)
        with open(fd, "rb") as f:
            if size > limit:
                raise ValueError(f"{size} bytes (more than {limit})")
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"more than {limit} bytes (it grew while read)")
        return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        fd, _ = self._open(rel)
        with open(fd, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def size(self, rel: str) -> int:
        fd, size = self._open(rel)
        os.close(fd)
        return size

    def list(self, rel: str) -> dict[str, Any]:
        """``{name: inode}`` of the folder ``rel`` (empty if it is missing or not a folder)."""
        try:
            fd = os.open(os.path.join(self.root, rel), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        except OSError as e:
            if not isinstance(e, FileNotFoundError):
                log.debug("exchange folder %s is unusable: %s", rel, e)
            return {}
        try:
            with os.scandir(fd) as entries:
                return {e.name: e.inode() for e in entries}
        finally:
            os.close(fd)

    def remove(self, rel: str) -> None:
        try:
            os.remove(os.path.join(self.root, rel))
        except FileNotFoundError:
            pass


class _FsspecStore:
    """Any fsspec filesystem (s3://, gs://, memory://, ...): whole-object puts, manifest last.

    Listings and sizes always come from the store: a filesystem's listings cache (s3fs and
    gcsfs keep one, forever by default) would hide other writers' new versions. Transient
    errors (5xx, timeouts, dropped connections) are retried with exponential backoff
    (``RETRIES`` times); missing objects, refused credentials and bad requests are not."""

    RETRIES, BACKOFF = 3, 0.2  # seconds before the first retry; doubled each time

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if module := PROTOCOL_MODULES.get(url.split("://", 1)[0]):
            require(module, f"the exchange {url!r}")
        # A private instance: the credentials are those of the environment when the exchange is made.
        self.fs, self.root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **(storage_options or {}))
        self._check_access(url)

    def _check_access(self, url: str) -> None:
        """One listing of the root; ValueError naming ``url`` if the store refuses the
        credentials or cannot be reached."""
        try:
            self.list("")
        except PermissionError as e:
            raise ValueError(f"exchange {url!r}: access denied ({e}); check the credentials (for s3://: "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from e
        except Exception as e:  # noqa: BLE001 - an SDK's own connection errors are no OSError
            raise ValueError(f"exchange {url!r} cannot be reached: {e}") from e

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    @staticmethod
    def transient(error: Exception) -> bool:
        """Whether ``error`` may go away when the call is made again."""
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                              FileExistsError)):
            return False
        if isinstance(error, OSError) and error.errno in (errno.EINVAL, errno.ENOSYS):
            return False  # a bad request (400) or one the store does not implement (501)
        return isinstance(error, (OSError, ConnectionError, TimeoutError))

    def _retry(self, fn: Any, *args: Any, **kw: Any) -> Any:
        for attempt in range(self.RETRIES + 1):
            try:
                return fn(*args, **kw)
            except Exception as e:
                if attempt == self.RETRIES or not self.transient(e):
                    raise
                delay = self.BACKOFF * 2**attempt
                log.debug("exchange: %s failed (%s); retrying in %.1fs", fn.__name__, e, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _uncached(self, rel: str) -> str:
        """The path of ``rel``, dropped from the filesystem's listings cache."""
        path = self._path(rel)
        self.fs.invalidate_cache(path)
        return path

    def write(self, rel: str, data: bytes) -> None:
        self._retry(self.fs.pipe_file, self._path(rel), data)

    def size(self, rel: str) -> int:
        """The size of the file ``rel``; ValueError if it is not a file (a folder)."""
        info = self._retry(self.fs.info, self._uncached(rel))
        if info.get("type") != "file":
            raise ValueError(f"{rel} is not a file in the exchange ({info.get('type')})")
        return int(info["size"])

    def read(self, rel: str, limit: int) -> bytes:
        """The whole file ``rel``; ValueError if it has more than ``limit`` bytes (at most
        ``limit`` + 1 are fetched)."""
        size = self.size(rel)
        if size > limit:
            raise ValueError(f"{size} bytes (more than {limit})")
        data = self._retry(self.fs.cat_file, self._path(rel), start=0, end=limit + 1)
        if len(data) > limit:
            raise ValueError(f"more than {limit} bytes (it grew while read)")
        return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self._retry(self.fs.cat_file, self._path(rel), start=start, end=end)

    def list(self, rel: str) -> dict[str, Any]:
        """``{name: (size, tag)}`` of the files in the folder ``rel`` (folders left out); the tag
        is the content's (an ETag) where the store gives one, else a time."""
        try:
            entries = self._retry(self.fs.ls, self._uncached(rel), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (e.get("size"), str(_tag(e)))
                for e in entries if e.get("type") == "file"}

    def remove(self, rel: str) -> None:
        try:
            self._retry(self.fs.rm_file, self._path(rel))
        except FileNotFoundError:
            pass


def _tag(entry: dict[str, Any]) -> Any:
    """What changes when an object is written again: its content tag (S3's ``ETag``, GCS's
    generation), else its time (S3's ``LastModified`` has whole seconds only)."""
    for field in ("ETag", "etag", "generation", "mtime", "LastModified", "created"):
        if entry.get(field):
            return entry[field]
    return None


def _make_store(location: str, storage_options: dict[str, Any] | None) -> _LocalStore | _FsspecStore:
    if location.startswith("file://"):
        return _LocalStore(location[len("file://") :])
    if "://" in location:
        return _FsspecStore(location, storage_options)
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
    """Exchange through a directory or an fsspec URL; keeps the newest ``keep`` versions.
    ``storage_options``: passed to the URL's fsspec filesystem (e.g. ``{"endpoint_url": ...}``
    or ``{"profile": ...}`` for s3://; see docs/object-store.md)."""

    shared_storage = True  # others can write here: versions are signed and admitted (signing.py)

    def __init__(self, location: str, keep: int = 3, storage_options: dict[str, Any] | None = None) -> None:
        if keep < 2:
            # A reader may be loading the previous version while a new one lands.
            raise ValueError(f"keep must be >= 2 for a directory exchange, got {keep}")
        self.location = location
        self.keep = keep
        self.store = _make_store(location, storage_options)
        if isinstance(self.store, _FsspecStore):
            self.poll_seconds = OBJECT_STORE_POLL

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
        self._write(replica, step, f"{folder}/{name}.safetensors", data)
        self._write(replica, step, f"{folder}/{name}.json", json.dumps(manifest, indent=1).encode())
        self._prune(replica, step)
        return len(data)

    def _write(self, replica: int, step: int, rel: str, data: bytes) -> None:
        """Write ``rel``; on a full disk, make room among ``replica``'s older versions and
        try once more."""
        try:
            self.store.write(rel, data)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not (gone := self._make_room(replica, step)):
                raise
            log.warning("replica %d: the exchange is full (%s); removed its versions %s to publish "
                        "step %d", replica, e, gone, step)
            self.store.write(rel, data)

    def _prune(self, replica: int, step: int) -> None:
        """Keep the newest ``keep`` versions up to ``step``; remove those after it: not this
        run's (planted, or lost in a crash before a resume)."""
        steps = self.versions(replica)
        ahead, mine = [s for s in steps if s > step], [s for s in steps if s <= step]
        for s in ahead + mine[: -self.keep]:
            self._remove(replica, s)

    def _make_room(self, replica: int, step: int) -> list[int]:
        """Remove ``replica``'s versions other than the newest complete one before ``step``
        (and any after it), and weights without a manifest (a write that failed between the
        two); the steps removed."""
        steps = self.versions(replica)
        gone = [s for s in steps if s > step] + [s for s in steps if s < step][:-1]
        for s in gone:
            self._remove(replica, s)
        folder, names = self._folder(replica), self.store.list(self._folder(replica))
        for name in names:
            stem = name.removesuffix(".safetensors")
            if stem != name and f"{stem}.json" not in names and stem != _version_name(step):
                self.store.remove(f"{folder}/{name}")
                gone.append(int(stem) if stem.isascii() and stem.isdigit() else stem)
        return gone

    def _remove(self, replica: int, step: int) -> None:
        rel = f"{self._folder(replica)}/{_version_name(step)}"
        self.store.remove(f"{rel}.json")  # manifest first: never a half version
        self.store.remove(f"{rel}.safetensors")

    def clear(self, replica: int) -> None:
        for step in self.versions(replica):
            self._remove(replica, step)

    def listing(self, replica: int) -> dict[int, Any]:
        """``{step: token}``: the versions named as publish names them (``0000000050.json``),
        the token changing when one is written again (its inode, or an object's size and time)."""
        return {int(fname[:10]): token for fname, token in self.store.list(self._folder(replica)).items()
                if len(fname) == 15 and fname.endswith(".json") and fname[:10].isascii()
                and fname[:10].isdigit()}  # ASCII digits: '²'.isdigit() and '٣'.isdigit() are true

    def versions(self, replica: int) -> list[int]:
        return sorted(self.listing(replica))

    def load(self, replica: int, step: int, check: Check | None = None) -> Published | None:
        folder, name = self._folder(replica), _version_name(step)
        where = f"{self.location}/{folder}/{name}"
        try:
            manifest = self.store.read(f"{folder}/{name}.json", MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            log.debug("version %s vanished while reading (pruned)", where)
            return None
        except Exception as e:  # noqa: BLE001 - a FIFO, a symlink, a folder, an oversized file...
            if not self._unavailable(where, e):
                self.refuse(replica, step, f"{where}.json", f"unreadable manifest: {e}",
                            (replica, step, "manifest", str(e)))
            return None
        key = (replica, step, hashlib.sha256(manifest).hexdigest())
        if self._refused(key):
            self.refuse(replica, step, where, "", key)  # known: skipped until written again
            return None
        try:
            weights, expected, nbytes, meta = self._parse_manifest(manifest, step)
            if not signer_of(self).admit(parse_json(manifest), replica, step, where):  # signing.py
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
            data = self.store.read(rel, nbytes)
        except FileNotFoundError:
            log.debug("version %s vanished while reading (pruned)", where)
            return None
        except Exception as e:  # noqa: BLE001 - whatever a hostile entry raises rejects only it
            if not self._unavailable(where, e):
                self.refuse(replica, step, where, str(e) or type(e).__name__, key)
            return None
        if hashlib.sha256(data).hexdigest() != expected or len(data) != nbytes:
            self.refuse(replica, step, f"{where}.safetensors",
                        "checksum mismatch (corrupted or replaced file)", key)
            return None
        try:
            state = st_load(data)
        except Exception as e:  # safetensors raises its own error types
            self.refuse(replica, step, f"{where}.safetensors", f"unreadable ({e})", key)
            return None
        return Published(replica, step, state, meta, ident=expected)

    def _unavailable(self, where: str, error: Exception) -> bool:
        """Whether reading ``where`` failed on the store, not on the version (an object store
        still failing after its retries): then it is not rejected, and tried again at the next
        refresh. A local file that cannot be read (a symlink, a FIFO, no permission) is rejected."""
        if not isinstance(self.store, _FsspecStore) or not _FsspecStore.transient(error):
            return False
        log.warning("cannot read %s for now (%s); tried again at the next refresh", where, error)
        return True

    def ident(self, replica: int, step: int) -> str | None:
        """The weights' sha256 from the version's manifest (None if missing or unusable)."""
        rel = f"{self._folder(replica)}/{_version_name(step)}.json"
        try:
            return self._parse_manifest(self.store.read(rel, MAX_MANIFEST_BYTES), step)[1]
        except Exception:  # noqa: BLE001 - load rejects it and says why
            return None

    @staticmethod
    def _parse_manifest(raw: bytes, step: int) -> tuple[str, str, int, dict[str, Any]]:
        """(weights file name, sha256, size, meta) of a manifest, or ValueError."""
        manifest = parse_json(raw)
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
        raw = parse_json(self.store.read_range(rel, 8, 8 + n))
        if not isinstance(raw, dict):
            raise ValueError("safetensors header is not a mapping")
        header: Header = {}
        spans = []
        for name, entry in raw.items():
            if name == "__metadata__":
                continue
            dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
            start, end = entry["data_offsets"]
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
