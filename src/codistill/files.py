"""Files written whole or not at all, and their checksums.

Every file codistill writes for a reader to trust (checkpoints, the config, metrics kept on a
resume, the summary, final weights, torchrun's restart marker, an installed data set) goes
through :func:`atomic_write`: into a temporary name beside it, flushed to disk, then renamed
over the target, so a crash or a Ctrl-C leaves the old file or the new one, never a part.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

CHUNK = 1 << 20  # bytes read at a time when hashing


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename into it) to disk; also a file's contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes | str | Callable[[str], object], fsync: bool = True) -> str:
    """Write ``path`` whole or not at all: ``data`` (bytes, or text as UTF-8), or what
    ``data(tmp)`` writes at the temporary path it is given (e.g. ``safetensors.save_file``).
    ``fsync``: the file and then its directory's new entry are on disk before this returns.
    Returns ``path``."""
    folder, name = os.path.split(path)
    # Hidden and one per writer: a reader listing the folder never sees a part-written file.
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        if fsync:
            fsync_dir(tmp)  # a file's contents, as a directory's
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if fsync:
        fsync_dir(folder or ".")
    return path


def sha256_file(path: str) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
