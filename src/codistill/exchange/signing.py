"""Signed versions: who may publish in an exchange, and which run a version belongs to.

With a key the replicas share (``CODISTILL_EXCHANGE_KEY``, a key file, or the plug-in's
``exchange_key=``), every manifest a replica publishes carries ``kid`` (which key) and
``hmac``: HMAC-SHA256 over the canonical JSON (sorted keys, no spaces) of exactly the fields
in :data:`SIGNED`: the format, replica, step, run id, weights file name, its SHA-256 and size,
the meta (the model spec peers may build a teacher from) and the kid. The SHA-256 binds the
weights, so nothing a reader uses is unsigned (``time`` is informational). A reader that has
a key rejects an unsigned or wrongly signed version, or one signed for another replica or
step than where it lies, after reading its manifest and before a byte of its weights.

Keys are hexadecimal, at least 32 digits (16 bytes); several, separated by commas or white
space, make a rotation possible without stopping a run: the first signs, every one verifies
(a manifest's ``kid``, the first 8 hex digits of SHA-256 of the key, picks it). A key file
is read again whenever it changes, so replicas follow a rotation without a restart.

Every manifest also carries the publisher's ``run_id``; a reader that has a run id rejects
versions of any other (or none), so a new run does not read an old run's versions left in a
reused exchange. Signed, the run id is authenticated too.

Without a key nothing is authenticated, but a version more than :attr:`Signer.far_ahead`
steps ahead of every step this exchange has published or taken from that peer is skipped
(warned once) until the run catches up to within that distance: a planted far-future step
cannot take a teacher over for the rest of the run.

A key is never logged, written to a file or shown in an error (only its ``kid``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..env import ENV_KEY, ENV_RUN_ID  # the variables `codistill launch` passes on

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
FAR_AHEAD = 10_000  # steps; at least 10 exchange intervals (see Signer)
SIGNED = ("format", "replica", "step", "run_id", "weights", "sha256", "nbytes", "meta", "kid")
GENERATE = "python -c 'import secrets; print(secrets.token_hex(32))'"


class ExchangeKeyError(ValueError):
    """A key that cannot be used: missing, empty, not hexadecimal or too short."""


def key_id(key: bytes) -> str:
    """A key's public name: 8 hex digits of its SHA-256 (reveals nothing usable)."""
    return hashlib.sha256(key).hexdigest()[:8]


def parse_keys(text: str, source: str) -> list[bytes]:
    """Keys in ``text`` (hex, separated by commas or white space); errors name ``source``."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts:
        raise ExchangeKeyError(f"{source} holds no key (generate one with {GENERATE})")
    keys = []
    for i, part in enumerate(parts, 1):
        try:
            key = bytes.fromhex(part)
        except ValueError:
            raise ExchangeKeyError(f"{source}: key {i} is not hexadecimal (an even number of digits "
                                   f"0-9a-f; generate one with {GENERATE})") from None
        if len(key) < MIN_KEY_BYTES:
            raise ExchangeKeyError(f"{source}: key {i} has {len(key)} bytes, fewer than {MIN_KEY_BYTES} "
                                   f"({2 * MIN_KEY_BYTES} hex digits; generate one with {GENERATE})")
        keys.append(key)
    return keys


def read_key_file(path: str) -> list[bytes]:
    """The keys in the file ``path``; warns if other users may read it."""
    source = f"exchange key file {path}"
    try:  # non-blocking: a FIFO named as the key file must not hang the run
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ExchangeKeyError(f"{source} is not a regular file")
            raw = f.read(1 << 16)
    except FileNotFoundError:
        raise ExchangeKeyError(f"{source} does not exist") from None
    except OSError as e:
        raise ExchangeKeyError(f"{source} cannot be read: {e.strerror}") from None
    if mode & 0o077:
        log.warning("%s can be read by other users (mode %03o): chmod 600 it", source, mode & 0o777)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ExchangeKeyError(f"{source}: not a hexadecimal key (generate one with {GENERATE})") from None
    return parse_keys(text, source)


def load_keys(key: str | bytes | Sequence[str | bytes] | None = None, key_file: str | None = None,
              environ: Mapping[str, str] | None = None) -> list[bytes]:
    """The keys to sign and verify with, the first signing: ``key`` (hex text, raw bytes, or a
    list of them), else the file ``key_file``, else ``CODISTILL_EXCHANGE_KEY``; [] for none."""
    env = os.environ if environ is None else environ
    if key is not None and key_file is not None:
        raise ExchangeKeyError("give exchange_key or exchange_key_file, not both")
    if key is not None:
        keys: list[bytes] = []
        for item in [key] if isinstance(key, (str, bytes)) else list(key):
            if isinstance(item, bytes):
                if len(item) < MIN_KEY_BYTES:
                    raise ExchangeKeyError(f"exchange_key has {len(item)} bytes, fewer than {MIN_KEY_BYTES}")
                keys.append(item)
            else:
                keys += parse_keys(str(item), "exchange_key")
        if not keys:
            raise ExchangeKeyError("exchange_key holds no key")
        return keys
    if key_file:
        return read_key_file(os.path.expanduser(key_file))
    if ENV_KEY in env:
        return parse_keys(env[ENV_KEY], f"the environment variable {ENV_KEY}")
    return []


class Signer:
    """Signs the manifests one exchange writes and admits the versions it reads.

    ``keys``: the first signs, all verify ([]: nothing signed, nothing required), or
    ``key_file``: read now, and read again whenever it changes (so keys rotate without a
    restart; a changed file that is unusable keeps the keys in use, with a warning);
    ``run_id``: written into every manifest; a reader with one rejects other run ids (None:
    accept any); ``exchange_every``: K, for the far-ahead distance ``max(10·K, 10,000)``.
    """

    def __init__(self, keys: Sequence[bytes] = (), run_id: str | None = None,
                 exchange_every: int | None = None, key_file: str | None = None) -> None:
        self.key_file = os.path.expanduser(key_file) if key_file else None
        self._stamp = _stamp(self.key_file) if self.key_file else None
        self._use(read_key_file(self.key_file) if self.key_file else keys)
        self.run_id = run_id
        self.far_ahead = max(10 * exchange_every, FAR_AHEAD) if exchange_every else FAR_AHEAD
        self.rejected = 0  # versions rejected: unsigned, wrongly signed, another run
        self.skipped_far_ahead = 0  # versions skipped as implausibly far ahead (no key)
        self.published: int | None = None  # newest step published through this exchange
        self.seen: dict[int, int] = {}  # per peer: newest step admitted
        self._warned: set[tuple] = set()

    def _use(self, keys: Sequence[bytes]) -> None:
        # One assignment: the writer and the prefetch threads never see half a key set.
        self._ring = ({key_id(k): bytes(k) for k in keys}, key_id(keys[0]) if keys else None)

    def _reload(self) -> None:
        """Read the key file again if it changed since it was last read."""
        if self.key_file is None or (stamp := _stamp(self.key_file)) == self._stamp:
            return
        self._stamp = stamp
        try:
            keys = read_key_file(self.key_file)
        except ExchangeKeyError as e:
            log.warning("%s: keeping the %d key(s) in use", e, len(self._ring[0]))
            return
        self._use(keys)
        log.info("exchange keys read again from %s: kids %s, %s signs", self.key_file,
                 ", ".join(self._ring[0]), self._ring[1])

    def __repr__(self) -> str:  # never the keys
        return f"Signer(kids={sorted(self._ring[0])}, run_id={self.run_id!r})"

    @property
    def keyed(self) -> bool:
        return bool(self._ring[0])

    def note_published(self, step: int) -> None:
        self.published = step if self.published is None else max(self.published, step)

    def sign(self, manifest: dict[str, Any]) -> None:
        """Add ``run_id`` and, with a key, ``kid`` and ``hmac`` to ``manifest`` (in place)."""
        manifest["run_id"] = self.run_id
        self.note_published(manifest["step"])
        self._reload()
        keys, signing = self._ring
        if signing is None:
            return
        # The meta as a reader will parse it back (tuples become lists, keys strings).
        manifest["meta"] = json.loads(json.dumps(manifest["meta"]))
        manifest["kid"] = signing
        manifest["hmac"] = _mac(keys[signing], manifest)

    def admit(self, manifest: dict[str, Any], replica: int, step: int, where: str) -> bool:
        """True if the version may be read. ValueError (rejected for good) if it is unsigned
        or wrongly signed while this reader has a key, or of another run. False (not now,
        warned once) if it is signed with a key this reader does not have yet (a rotation
        under way) or, without a key, if it is implausibly far ahead."""
        self._reload()
        keys = self._ring[0]
        kid = manifest.get("kid")
        if keys and isinstance(kid, str) and kid not in keys and manifest.get("hmac") is not None:
            if self._warn_once((replica, step, kid)):
                self.rejected += 1
                log.warning("skipping %s: signed with a key this reader does not have (kid %r); read "
                            "again if that key is added", where, kid)
            return False
        try:
            self._verify(keys, manifest, replica, step)
        except ValueError:
            self.rejected += 1
            raise
        if not keys:
            ref = max((s for s in (self.published, self.seen.get(replica)) if s is not None), default=None)
            if ref is not None and step > ref + self.far_ahead:
                if self._warn_once((replica, step)):
                    self.skipped_far_ahead += 1
                    log.warning("skipping %s: step %d is more than %d steps ahead of step %d, the newest "
                                "this replica has published or taken from replica %d (unsigned: set "
                                "%s to authenticate versions); it is taken once the run catches up",
                                where, step, self.far_ahead, ref, replica, ENV_KEY)
                return False
        self.seen[replica] = max(self.seen.get(replica, step), step)
        return True

    def _warn_once(self, key: tuple) -> bool:
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

    def _verify(self, keys: dict[str, bytes], manifest: dict[str, Any], replica: int, step: int) -> None:
        if keys:
            kid, mac = manifest.get("kid"), manifest.get("hmac")
            if kid is None and mac is None:
                raise ValueError("unsigned version (this reader has an exchange key)")
            key = keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise ValueError(f"signed with a key this reader does not have (kid {kid!r})")
            if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, manifest)):
                raise ValueError("bad signature (the manifest was altered or signed with another key)")
            signed = (manifest.get("replica"), manifest.get("step"))
            if signed != (replica, step):
                raise ValueError(f"signed for replica {signed[0]!r} step {signed[1]!r}, found as replica "
                                 f"{replica} step {step}")
        if self.run_id is not None and manifest.get("run_id") != self.run_id:
            raise ValueError(f"published by run {manifest.get('run_id')!r}, this is run {self.run_id!r}")


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _mac(key: bytes, manifest: dict[str, Any]) -> str:
    body = {k: manifest.get(k) for k in SIGNED}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


# -- attaching a signer to an exchange ------------------------------------------------
def _directory(exchange: Any) -> Any:
    """The directory exchange inside ``exchange`` (unwrapping a background writer), or None."""
    while not getattr(exchange, "shared_storage", False) and hasattr(exchange, "inner"):
        exchange = exchange.inner
    return exchange if getattr(exchange, "shared_storage", False) else None


def signer_of(exchange: Any) -> Signer:
    """The signer of ``exchange`` (a keyless one without a run id if none was attached)."""
    found = exchange.__dict__.get("_signer")
    if found is None:
        found = exchange.__dict__.setdefault("_signer", Signer())
    return found


def attach(exchange: Any, signer: Signer) -> None:
    """Sign and verify ``exchange``'s versions with ``signer`` (no-op for an exchange that
    is not a directory or URL: in-process and collective exchanges are not shared storage)."""
    directory = _directory(exchange)
    if directory is not None:
        old = directory.__dict__.get("_signer")
        if old is not None:  # keep what it has seen and published
            signer.published, signer.seen = old.published, old.seen
        directory.__dict__["_signer"] = signer


def attached(exchange: Any) -> bool:
    directory = _directory(exchange)
    return directory is not None and directory.__dict__.get("_signer") is not None


def note_published(exchange: Any, step: int) -> None:
    """Record that this process publishes ``step`` (before a background write lands)."""
    directory = _directory(exchange)
    if directory is not None:
        signer_of(directory).note_published(step)


@dataclass(frozen=True)
class Trust:
    """What a Codistiller accepts from its exchange (untrusted input).

    Args:
        key, key_file: the key shared by every replica (hex text, raw bytes or a list, the
            first signing; or a file holding it), default ``CODISTILL_EXCHANGE_KEY``: a
            directory or URL exchange then signs every version and rejects unsigned or
            wrongly signed ones before reading their weights.
        run_id: written into every version; peers' versions of another run id are rejected
            (default ``CODISTILL_RUN_ID``; None: any run's versions are read).
        max_teacher_bytes: a peer's weights larger than this are rejected before they are
            read (default: 4× this replica's own weights).
    """

    key: str | bytes | Sequence[str | bytes] | None = None
    key_file: str | None = None
    run_id: str | None = None
    max_teacher_bytes: int | None = None


def configure(exchange: Any, key: Any = None, key_file: str | None = None, run_id: str | None = None,
              exchange_every: int | None = None) -> None:
    """The plug-in's signing: attach a signer from its arguments (``run_id`` None: from
    ``CODISTILL_RUN_ID``, else any run accepted; keys: see :func:`load_keys`), unless none
    is given and the exchange already has one (the config's, attached by the trainer)."""
    if _directory(exchange) is None:
        if key is not None or key_file is not None:
            log.warning("exchange_key is ignored: the exchange is not a directory or URL")
        return
    if key is None and key_file is None and run_id is None and attached(exchange):
        return
    if key is not None and key_file is not None:
        raise ExchangeKeyError("give exchange_key or exchange_key_file, not both")
    keys = [] if key_file else load_keys(key)
    attach(exchange, Signer(keys, run_id if run_id is not None else os.environ.get(ENV_RUN_ID) or None,
                            exchange_every, key_file))


def run_id_of(cfg: Any) -> str:
    """A config run's id: ``codistill.run_id``, else ``CODISTILL_RUN_ID``, else
    ``NAME-seedSEED`` (the same for every replica, in every launch mode, across resumes)."""
    return cfg.codistill.run_id or os.environ.get(ENV_RUN_ID) or f"{cfg.name}-seed{cfg.seed}"


def secure(exchange: Any, cfg: Any) -> None:
    """Attach the config's signer to ``exchange``: keys from ``codistill.exchange_key_file``
    or ``CODISTILL_EXCHANGE_KEY``, the run id of :func:`run_id_of`."""
    if _directory(exchange) is None:
        return
    c = cfg.codistill
    keys = [] if c.exchange_key_file else load_keys()
    attach(exchange, Signer(keys, run_id_of(cfg), c.exchange_every, c.exchange_key_file))
