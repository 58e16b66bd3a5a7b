"""Data sets that ship as Debian packages: ``apt-get download`` + ``dpkg -x``, no root needed.

Used only by the set-up step (``codistill data NAME``); training never downloads.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
from collections.abc import Callable

log = logging.getLogger(__name__)

APT_TIMEOUT = 900  # seconds for one apt-get/dpkg command


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/codistill``, or ``~/.cache/codistill``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "codistill")


def search_dirs(name: str, system: str | None = None) -> list[str]:
    """Where data set ``name`` is looked for: ``$CODISTILL_DATA/NAME``, the cache, ``system``."""
    dirs = []
    if os.environ.get("CODISTILL_DATA"):
        dirs.append(os.path.join(os.environ["CODISTILL_DATA"], name))
    dirs.append(os.path.join(default_cache_dir(), name))
    if system:
        dirs.append(system)
    return dirs


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    log.info("running: %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {e}") from e


def _check(proc: subprocess.CompletedProcess[str], cmd: list[str], hint: str = "") -> None:
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-10:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {tail}{hint}")


def download_deb(package: str, tmp: str) -> str:
    """``apt-get download PACKAGE`` into ``tmp`` (as root: ``apt-get update`` once on failure);
    the path of the .deb."""
    cmd = ["apt-get", "download", package]
    proc = _run(cmd, tmp)
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if proc.returncode != 0 and root:
        log.info("apt-get download failed; updating the package lists once and retrying")
        _check(_run(["apt-get", "update"], tmp), ["apt-get", "update"])
        proc = _run(cmd, tmp)
    hint = "" if root else "\n(as root, run `apt-get update` first; or set data.dir to a copy of the files)"
    _check(proc, cmd, hint)
    debs = sorted(glob.glob(os.path.join(tmp, f"{package}_*.deb")))
    if not debs:
        raise RuntimeError(f"`{' '.join(cmd)}` produced no {package}_*.deb in {tmp}")
    return debs[-1]


def extract_deb(deb: str, dest: str) -> str:
    """``dpkg -x DEB DEST``; returns ``dest``."""
    cmd = ["dpkg", "-x", deb, dest]
    _check(_run(cmd, os.path.dirname(deb) or "."), cmd)
    return dest


def already_installed(what: str, dest: str | None, find: Callable[[], str], default: Callable[[], str],
                      complete: Callable[[str], bool]) -> tuple[str, bool]:
    """(directory, whether ``what`` is already there) for an install step: without ``dest``,
    the directory ``find()`` finds (else ``default()``, to be filled); with ``dest``, ``dest``,
    there already if ``complete(dest)``."""
    if dest is None:
        try:
            found = find()
        except FileNotFoundError:
            return default(), False
        log.info("%s already in %s", what, found)
        return found, True
    if complete(dest):
        log.info("%s already in %s", what, dest)
        return dest, True
    return dest, False
