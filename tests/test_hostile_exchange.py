"""The exchange is untrusted input: oversized files, hostile headers and model specs are
rejected before they are read or built, warned about once, and training goes on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from codistill.codistiller import Codistiller, Newest
from codistill.exchange import DirectoryExchange, signing, state_nbytes
from codistill.models import build_model

SPEC = {"name": "lstm", "vocab_size": 20, "embed_dim": 8, "hidden_dim": 12}


def _bytes_read() -> int:
    """Bytes this process has read through read() calls (Linux ``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def _pair(tmp_path, **kw):
    torch.manual_seed(0)
    student, peer = build_model(SPEC), build_model(SPEC)
    ex = DirectoryExchange(str(tmp_path))
    cd = Codistiller(student, ex, replica=0, num_replicas=2, model_spec=SPEC, **kw)
    return cd, peer, ex


def _forge(tmp_path, step: int, data: bytes, meta: dict | None = None, nbytes: int | None = None,
           sha: str = "0" * 64) -> None:
    """Write a version of replica 1 by hand, as another job on the shared storage could."""
    folder = tmp_path / "replica-1"
    folder.mkdir(exist_ok=True)
    name = f"{step:010d}"
    (folder / f"{name}.safetensors").write_bytes(data)
    (folder / f"{name}.json").write_text(json.dumps({
        "format": "codistill-exchange/1", "replica": 1, "step": step, "weights": f"{name}.safetensors",
        "sha256": sha, "nbytes": len(data) if nbytes is None else nbytes, "meta": meta or {}}))


def test_an_oversized_file_is_rejected_before_it_is_read_and_warned_about_once(tmp_path, caplog):
    cd, peer, ex = _pair(tmp_path)
    ex.publish(1, 10, peer.state_dict(), {"model": SPEC})
    assert cd.refresh(10) == {1: 10}  # (imports done: they read files too)
    big = tmp_path / "replica-1" / f"{20:010d}.safetensors"
    (tmp_path / "replica-1").mkdir(exist_ok=True)
    with open(big, "wb") as f:  # a 20 GB sparse file: nothing on disk, all of it readable
        f.truncate(20 << 30)
    _forge(tmp_path, 20, b"", meta={"model": SPEC}, nbytes=20 << 30)
    before = _bytes_read()
    with caplog.at_level(logging.WARNING, logger="codistill"):
        for step in (20, 25, 30):
            assert cd.refresh(step) == {1: 10}  # falls back to the valid version
    assert _bytes_read() - before < 4 * state_nbytes(peer.state_dict()) + (1 << 20)
    assert caplog.text.count("exceed the bound") == 1  # remembered, not read again
    assert cd.teachers.max_bytes == 4 * state_nbytes(peer.state_dict())


def test_a_file_larger_than_its_manifest_says_is_not_read(tmp_path, caplog):
    cd, peer, ex = _pair(tmp_path)
    ex.publish(1, 10, peer.state_dict(), {"model": SPEC})
    assert cd.refresh(10) == {1: 10}
    with open(tmp_path / "replica-1" / f"{20:010d}.safetensors", "wb") as f:
        f.truncate(20 << 30)
    (tmp_path / "replica-1" / f"{20:010d}.json").write_text(json.dumps({  # lies about the size
        "format": "codistill-exchange/1", "replica": 1, "step": 20, "weights": f"{20:010d}.safetensors",
        "sha256": "0" * 64, "nbytes": 1000, "meta": {}}))
    before = _bytes_read()
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert cd.refresh(20) == {1: 10}
    assert _bytes_read() - before < (1 << 20) + 4 * state_nbytes(peer.state_dict())
    assert "exceed the bound" in caplog.text


def _safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("case", ["huge header length", "offsets overlap", "offsets past the end",
                                  "wrong dtype name", "negative shape", "bytes do not match shape"])
def test_a_hostile_safetensors_header_is_rejected(tmp_path, caplog, case):
    cd, peer, ex = _pair(tmp_path)
    ex.publish(1, 10, peer.state_dict(), {"model": SPEC})
    body = bytes(64)
    header = {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
              "b": {"dtype": "F32", "shape": [8], "data_offsets": [32, 64]}}
    if case == "huge header length":
        data = struct.pack("<Q", 1 << 60) + bytes(64)
    else:
        if case == "offsets overlap":
            header["b"]["data_offsets"] = [16, 48]
        elif case == "offsets past the end":
            header["b"]["data_offsets"] = [32, 640]
            header["b"]["shape"] = [152]
        elif case == "wrong dtype name":
            header["a"]["dtype"] = "PICKLE"
        elif case == "negative shape":
            header["a"]["shape"] = [-8]
        elif case == "bytes do not match shape":
            header["a"]["shape"] = [9]
        data = _safetensors(header, body)
    _forge(tmp_path, 20, data)
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert cd.refresh(20) == {1: 10}
    assert "skipping" in caplog.text and "0000000020" in caplog.text


def test_weights_that_do_not_fit_the_teacher_are_rejected_from_their_header(tmp_path, caplog):
    cd, peer, ex = _pair(tmp_path)
    ex.publish(1, 10, peer.state_dict(), {"model": SPEC})
    assert cd.refresh(10) == {1: 10}
    state = dict(peer.state_dict())
    state["head.weight"] = state["head.weight"].t().contiguous()  # same bytes, other shape
    ex.publish(1, 20, state, {"model": SPEC})
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert cd.refresh(20) == {1: 10} and cd.refresh(25) == {1: 10}
    assert caplog.text.count("do not fit the teacher") == 1


@pytest.mark.slow
def test_an_oversized_model_spec_allocates_nothing(tmp_path):
    """A manifest claiming a huge model next to small weights: the teacher is never built.
    Measured in a fresh process: its peak memory stays far below the 1.3 GB such a model takes."""
    script = textwrap.dedent(f"""
        import resource, torch
        from codistill.codistiller import Codistiller
        from codistill.exchange import DirectoryExchange
        from codistill.models import build_model
        spec = {SPEC!r}
        torch.manual_seed(0)
        ex = DirectoryExchange({str(tmp_path)!r})
        peer = build_model(spec)
        ex.publish(1, 10, peer.state_dict(), {{"model": dict(spec, hidden_dim=8000)}})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cd = Codistiller(build_model(spec), ex, replica=0, num_replicas=2, model_spec=spec)
        print(cd.refresh(10)[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded, grown_kb = out.stdout.split()
    assert loaded == "None" and "do not fit the teacher" in out.stderr
    assert int(grown_kb) < 100_000  # under 100 MB (the claimed model is 1.3 GB)


def test_a_spec_that_cannot_be_built_is_one_warning(tmp_path, caplog):
    cd, peer, ex = _pair(tmp_path)
    ex.publish(1, 10, peer.state_dict(), {"model": {"name": "lstm", "vocab_size": "many"}})
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert cd.refresh(10) == {1: None} and cd.refresh(15) == {1: None}
    assert caplog.text.count("cannot build a teacher") == 1


def test_a_peer_with_non_finite_weights_is_dropped_until_a_finite_version(tmp_path, caplog):
    cd, peer, ex = _pair(tmp_path)
    ex.publish(1, 10, peer.state_dict(), {"model": SPEC})
    assert cd.refresh(10) == {1: 10}
    diverged = {k: v * float("nan") for k, v in peer.state_dict().items()}
    ex.publish(1, 20, diverged, {"model": SPEC})
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert cd.refresh(20) == {1: 10} and cd.refresh(25) == {1: 10}
    assert caplog.text.count("non-finite weights") == 1
    ex.publish(1, 30, peer.state_dict(), {"model": SPEC})
    assert cd.refresh(30) == {1: 30}


def test_a_step_published_again_after_a_crash_is_reloaded(tmp_path):
    cd, peer, ex = _pair(tmp_path)
    ex.publish(1, 10, peer.state_dict(), {"model": SPEC})
    assert cd.refresh(10) == {1: 10}
    with torch.no_grad():  # the peer crashed, resumed from an older checkpoint, and reached step 10 again
        for p in peer.parameters():
            p.add_(1.0)
    ex.publish(1, 10, peer.state_dict(), {"model": SPEC})
    assert cd.refresh(12) == {1: 10}
    for k, v in peer.state_dict().items():
        assert torch.equal(cd.teachers[1].module.state_dict()[k], v), k
    read = cd.stats().bytes_read
    cd.refresh(14)  # unchanged: not read again
    assert cd.stats().bytes_read == read


# -- issue 15: entries that are not regular files, hostile names and JSON, junk in bulk ------
@pytest.fixture
def alarm():
    """A test that would hang (reading a FIFO) fails after 20 s instead."""
    def hang(*_):
        raise TimeoutError("the refresh blocked")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _valid(tmp_path, peer, step: int = 10):
    """A valid version of replica 1 published at ``step``, and the files of a copy of it."""
    DirectoryExchange(str(tmp_path)).publish(1, step, peer.state_dict(), {"model": SPEC})
    name = tmp_path / "replica-1" / f"{step:010d}"
    return name.with_suffix(".json"), name.with_suffix(".safetensors")


def _plant(tmp_path, peer, case: str, step: int = 20) -> None:
    """Plant one hostile entry of replica 1 at ``step``, as another job on the storage could."""
    folder = tmp_path / "replica-1"
    folder.mkdir(exist_ok=True)
    manifest, weights = folder / f"{step:010d}.json", folder / f"{step:010d}.safetensors"
    if case == "manifest is a FIFO":
        os.mkfifo(manifest)
    elif case == "manifest links to /dev/zero":
        os.symlink("/dev/zero", manifest)
    elif case == "manifest is a folder":
        manifest.mkdir()
    elif case == "manifest links to itself":
        os.symlink(manifest.name, manifest)
    elif case == "manifest nested 100,000 deep":
        manifest.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "manifest is junk":
        manifest.write_text("{}")
    else:  # a manifest that is right in every field; the weights are the hostile part
        outside = tmp_path.parent / f"{tmp_path.name}-outside"
        outside.mkdir(exist_ok=True)
        m, w = _valid(outside, peer, step)
        info = json.loads(m.read_text())
        if case == "weights are a folder":
            weights.mkdir()
        elif case == "weights link outside the exchange":
            os.symlink(w, weights)  # a valid copy, checksum and all
        elif case == "weights link to /dev/zero":
            os.symlink("/dev/zero", weights)
        elif case == "header nested 100,000 deep":
            raw = b"[" * 100_000 + b"]" * 100_000
            data = struct.pack("<Q", len(raw)) + raw
            weights.write_bytes(data)
            info.update(nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        else:
            raise AssertionError(case)
        manifest.write_text(json.dumps(info))


NOT_FILES = ["manifest is a FIFO", "manifest links to /dev/zero", "manifest is a folder",
             "manifest links to itself", "manifest nested 100,000 deep", "weights are a folder",
             "weights link outside the exchange", "weights link to /dev/zero", "header nested 100,000 deep"]


@pytest.mark.parametrize("case", NOT_FILES)
def test_an_entry_that_is_not_a_regular_file_or_is_too_deep_is_one_rejection(tmp_path, caplog, alarm, case):
    """Before: a FIFO hung the refresh, /dev/zero grew the process past 3 GB, a folder or a
    symlink loop raised out of refresh, deep JSON raised RecursionError, a symlink out of
    the exchange was loaded. Now each is a rejection: warned about once, counted, the valid
    version kept; and nothing more than the bound is read."""
    cd, peer, _ = _pair(tmp_path)
    _valid(tmp_path, peer)
    assert cd.refresh(10) == {1: 10}
    _plant(tmp_path, peer, case)
    before = _bytes_read()
    with caplog.at_level(logging.WARNING, logger="codistill"):
        for step in (20, 25, 30):
            assert cd.refresh(step) == {1: 10}
    assert _bytes_read() - before < 2 << 20  # the manifest bound (1 MB) and a header, not /dev/zero
    assert caplog.text.count("skipping") == 1 and "0000000020" in caplog.text
    assert cd.stats().rejected_versions == 1


def test_a_symlinked_replica_folder_is_not_followed(tmp_path):
    cd, peer, _ = _pair(tmp_path / "ex")
    _valid(tmp_path / "elsewhere", peer)
    os.symlink(tmp_path / "elsewhere" / "replica-1", tmp_path / "ex" / "replica-1")
    assert cd.exchange.versions(1) == []
    assert cd.refresh(10) == {1: None}


@pytest.mark.parametrize("name", ["².json", "٣.json", "٣٣٣٣٣٣٣٣٣٣.json", "０００００００００２.json",
                                  "000000002².json", "20.json", "00000000020.json", "0000000020.JSON",
                                  "0000000020.json.tmp", " 0000000020.json"])
def test_only_the_names_publish_writes_are_versions(tmp_path, name):
    """Before: '²'.isdigit() is True, and int('²') raised out of refresh."""
    cd, peer, ex = _pair(tmp_path)
    _valid(tmp_path, peer)
    (tmp_path / "replica-1" / name).write_text("{}")
    assert ex.versions(1) == [10]
    assert cd.refresh(10) == {1: 10}


@pytest.mark.slow
def test_20000_junk_manifests_cost_a_bounded_refresh(tmp_path, caplog, monkeypatch):
    """Before: every refresh read all 20,000 and warned 20,000 times (training 28x slower).
    Now a refresh opens at most CANDIDATES entries of a peer, rejected ones are not opened
    again, warnings are a few lines; the peer's next publish removes them (steps after its own)."""
    from codistill.exchange.base import CANDIDATES, WARN_EACH
    from codistill.exchange.directory import _LocalStore

    # (reading ahead also walks the junk, off the step)
    cd, peer, ex = _pair(tmp_path, wait=Newest(prefetch=False))
    _valid(tmp_path, peer)
    assert cd.refresh(10) == {1: 10}
    folder = tmp_path / "replica-1"
    for step in range(100, 20_100):
        (folder / f"{step:010d}.json").write_text("{}")
    opened = []
    real = _LocalStore._open
    monkeypatch.setattr(_LocalStore, "_open", lambda self, rel: opened.append(rel) or real(self, rel))
    refreshes = 30
    with caplog.at_level(logging.WARNING, logger="codistill"):
        for i in range(refreshes):
            assert cd.refresh(15 + 5 * i) == {1: 10}  # the loaded version is kept
    rejected = refreshes * CANDIDATES
    assert cd.stats().rejected_versions == rejected
    assert len(opened) <= rejected + refreshes  # the junk once each, and the kept version's manifest
    assert len(set(opened)) >= rejected  # each bad entry read once, not once per refresh
    assert len(caplog.records) <= WARN_EACH + 3  # one by one, then at 10 and 100
    ex.publish(1, 20, peer.state_dict(), {"model": SPEC})  # the peer itself, at its next publish
    assert ex.versions(1) == [10, 20]
    assert cd.refresh(200) == {1: 20}


def test_a_far_future_or_lost_future_version_is_removed_by_the_peers_next_publish(tmp_path):
    """Before: a valid version planted at step 9999999999 was the peer's 'newest' for good,
    and its own pruning removed its real versions instead."""
    torch.manual_seed(0)
    peer = build_model(SPEC)
    mine = DirectoryExchange(str(tmp_path))
    for step in (10, 20, 30):
        mine.publish(1, step, peer.state_dict(), {"model": SPEC})
    DirectoryExchange(str(tmp_path / "other")).publish(1, 9_999_999_999, peer.state_dict(), {})
    for ext in ("json", "safetensors"):  # planted by another job
        os.rename(tmp_path / "other" / "replica-1" / f"9999999999.{ext}",
                  tmp_path / "replica-1" / f"9999999999.{ext}")
    assert mine.versions(1) == [10, 20, 30, 9_999_999_999]
    mine.publish(1, 40, peer.state_dict(), {"model": SPEC})
    assert mine.versions(1) == [20, 30, 40]
    assert sorted(p.name for p in (tmp_path / "replica-1").iterdir()) == [
        f"{s:010d}.{ext}" for s in (20, 30, 40) for ext in ("json", "safetensors")]
    mine.publish(1, 30, peer.state_dict(), {"model": SPEC})  # resumed from step 30: 40 was lost
    assert mine.versions(1) == [20, 30]


def _overflowing(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights that are finite (3e38 < the fp32 maximum 3.4e38) and overflow in any forward."""
    return {k: torch.full_like(v, 3e38) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def test_a_teacher_whose_predictions_overflow_is_dropped_and_named(tmp_path, caplog):
    """Before: the honest replica's loss turned NaN and the run stopped, blaming itself.
    Now the teacher is dropped until its next version (one warning naming the peer and its
    step); ψ comes from the other teachers, or is 0 without any."""
    torch.manual_seed(0)
    student, one, two = build_model(SPEC), build_model(SPEC), build_model(SPEC)
    ex = DirectoryExchange(str(tmp_path))
    cd = Codistiller(student, ex, replica=0, num_replicas=3, model_spec=SPEC)
    ex.publish(1, 20, _overflowing(one), {"model": SPEC})
    ex.publish(2, 20, two.state_dict(), {"model": SPEC})
    assert cd.refresh(20) == {1: 20, 2: 20}  # the weights are finite: loaded
    x = torch.randint(0, SPEC["vocab_size"], (4, 8))
    with caplog.at_level(logging.WARNING, logger="codistill"):
        for _ in range(3):
            a, logits = cd.distill_target(x, 20)
            psi = cd.distill_loss(x, student(x), 20)
    assert torch.isfinite(psi) and psi > 0
    # ψ reads teacher 2 alone (the same forward: equal to the last bit)
    assert len(logits) == 1 and torch.equal(logits[0], cd.teachers[2].logits(x))
    assert caplog.text.count("non-finite") == 1
    assert "peer 1" in caplog.text and "step 20" in caplog.text and "replica 0" not in caplog.text
    assert cd.stats().rejected_versions == 1
    ex.publish(2, 30, _overflowing(two), {"model": SPEC})
    cd.refresh(30)
    assert cd.distill_target(x, 30) is None and cd.distill_loss(x, student(x), 30) == 0  # no teacher left
    ex.publish(1, 40, one.state_dict(), {"model": SPEC})
    assert cd.refresh(40) == {1: 40, 2: 30}
    (got,) = cd.distill_target(x, 40)[1]
    torch.testing.assert_close(got, cd.teachers[1].logits(x), rtol=0, atol=0)


def _full_disk(monkeypatch, capacity: int) -> None:
    """The local store's writes fail as a full disk does (ENOSPC) once the files under its
    root and the new data would exceed ``capacity`` bytes."""
    import errno

    from codistill.exchange.directory import _LocalStore

    real = _LocalStore.write

    def write(self, rel, data):
        used = sum(p.stat().st_size for p in Path(self.root).rglob("*") if p.is_file())
        if used + len(data) > capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, rel, data)

    monkeypatch.setattr(_LocalStore, "write", write)


def test_a_full_disk_prunes_older_versions_to_make_room(tmp_path, monkeypatch):
    """Before: the exchange stayed at its old versions for the rest of the run (pruning only
    after a successful write). Now the replica removes its older versions (keeping the newest
    complete one) and writes again; bytes_published counts what was written."""
    torch.manual_seed(0)
    model = build_model(SPEC)
    cd = Codistiller(model, str(tmp_path), replica=1, num_replicas=2, model_spec=SPEC)  # a background writer
    n = state_nbytes(model.state_dict())
    cd.publish(10)
    cd.exchange.flush()
    version = sum(p.stat().st_size for p in (tmp_path / "replica-1").iterdir())  # weights and manifest
    orphan = tmp_path / "replica-1" / f"{5:010d}.safetensors"  # weights whose manifest write failed
    orphan.write_bytes(bytes(version // 4))
    _full_disk(monkeypatch, int(3.5 * version))  # room for three versions (and the orphan)
    for step in (20, 30, 40):
        cd.publish(step)
        cd.exchange.flush()
    assert cd.exchange.versions(1) == [30, 40] and cd.exchange.inner.load(1, 30) is not None
    assert not orphan.exists()
    assert cd.stats().publish_failures == 0 and cd.stats().bytes_published == 4 * n


def test_a_failed_write_is_not_counted_as_published(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(SPEC)
    cd = Codistiller(model, str(tmp_path), replica=1, num_replicas=2, model_spec=SPEC)
    _full_disk(monkeypatch, 1000)  # not even one version fits
    cd.publish(10)
    cd.exchange.flush()
    stats = cd.stats()
    assert stats.publish_failures == 1 and stats.bytes_published == 0 and cd.exchange.versions(1) == []
    state = cd.state_dict(weights=False)
    assert state["bytes_published"] == 0


def test_an_object_store_refuses_folders_and_oversized_manifests(caplog):
    """The fsspec store: an entry must be a file (fs.info), reads are bounded (cat_file with
    an end), folders are not versions."""
    import fsspec

    from codistill.exchange.directory import MAX_MANIFEST_BYTES

    url = "memory://hostile-store"
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)
    torch.manual_seed(0)
    peer = build_model(SPEC)
    ex = DirectoryExchange(url)
    cd = Codistiller(build_model(SPEC), ex, replica=0, num_replicas=2, model_spec=SPEC,
                     wait=Newest(prefetch=False))
    ex.publish(1, 10, peer.state_dict(), {"model": SPEC})
    fs.mkdir(f"{url}/replica-1/0000000030.json")  # a folder named like a manifest: not a version
    fs.pipe_file(f"{url}/replica-1/0000000020.json", b" " * (MAX_MANIFEST_BYTES + 1))
    manifest = json.loads(fs.cat_file(f"{url}/replica-1/0000000010.json"))
    fs.mkdir(f"{url}/replica-1/0000000015.safetensors")  # weights that are a folder
    fs.pipe_file(f"{url}/replica-1/0000000015.json", json.dumps(
        {**manifest, "step": 15, "weights": "0000000015.safetensors"}).encode())
    assert ex.versions(1) == [10, 15, 20]
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert cd.refresh(20) == {1: 10} and cd.refresh(25) == {1: 10}
    assert "more than 1048576" in caplog.text and "not a file" in caplog.text
    assert cd.stats().rejected_versions == 2
    fs.rm(url, recursive=True)


@pytest.mark.slow
@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_a_run_with_hostile_entries_planted_as_its_peer_completes(tiny_config_factory, tmp_path,
                                                                  on_nonfinite):
    """End to end through the CLI: replica 0 of 2 runs alone; replica 1's folder holds a
    FIFO, a symlink to /dev/zero, a folder, a symlink loop, JSON nested 100,000 deep, weights
    linked out of the exchange, a weights folder, a deep header, unicode-digit names, and a
    valid version whose weights overflow in the forward (every weight 3e38). Before, any of
    the first five hung or killed the run, and the last stopped it ("training loss nan"; with
    ``on_nonfinite: skip``, every step was skipped and it stopped the same way)."""
    from codistill.config import from_dict
    from codistill.tasks import build_task

    values = tiny_config_factory(name="hostile", on_nonfinite=on_nonfinite)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps(values))
    ex = tmp_path / "ex"
    cfg = from_dict(values)
    task = build_task(cfg)
    torch.manual_seed(1)
    spec = task.model_spec(cfg.replica_model(1))
    real = task.build_model(spec)
    honest = DirectoryExchange(str(ex))
    signing.secure(honest, cfg)  # published as a peer of this run (its run id) would
    honest.publish(1, 5, _overflowing(real), {"model": spec})
    planted = {14: "manifest is a FIFO", 13: "manifest links to /dev/zero", 12: "manifest is a folder",
               11: "manifest links to itself", 9: "manifest nested 100,000 deep",
               8: "weights link outside the exchange", 7: "weights are a folder",
               6: "header nested 100,000 deep"}  # tried newest first, CANDIDATES per refresh
    for step, case in planted.items():
        _plant(ex, real, case, step)
    for name in ("².json", "٣٣٣٣٣٣٣٣٣٣.json", "0000000016.json.tmp"):
        (ex / "replica-1" / name).write_text("{}")
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "codistill", "train", str(cfg_path), "--out", str(run),
                          "--no-progress", "--replica", "0", "--num-replicas", "2", "--exchange", str(ex)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    rows = [json.loads(line) for line in (run / "metrics-replica0.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["step"] == values["steps"] and all(r["loss"] == r["loss"] for r in train)  # no NaN
    assert all(r["skipped"] == 0 for r in train)
    assert train[-1]["teacher_versions"] == {"1": 5}  # loaded (finite weights), then dropped
    assert train[-1]["rejected_versions"] == len(planted) + 1  # each planted entry, and the dropped teacher
    assert "peer 1 (its version of step 5) predicts non-finite values" in out.stderr
    assert out.stderr.count("skipping") <= len(planted)
    assert sorted(os.listdir(ex)) == ["replica-0", "replica-1"]


def test_a_store_that_cannot_be_listed_keeps_the_teachers(tmp_path, monkeypatch, caplog):
    cd, peer, ex = _pair(tmp_path, wait=Newest(prefetch=False))
    _valid(tmp_path, peer)
    assert cd.refresh(10) == {1: 10}

    def unreachable(*_):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ex.store, "list", unreachable)
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert cd.refresh(15) == {1: 10}
    assert "cannot list the versions of peer 1" in caplog.text


def test_a_file_whose_size_lies_is_read_only_to_the_bound(tmp_path, monkeypatch):
    """A regular file whose fstat says 0 bytes (as /proc's files do) is still read only to
    the bound + 1 bytes, then refused."""
    from codistill.exchange import directory
    from codistill.exchange.directory import MAX_MANIFEST_BYTES

    ex = DirectoryExchange(str(tmp_path))
    (tmp_path / "replica-1").mkdir()
    (tmp_path / "replica-1" / f"{20:010d}.json").write_bytes(bytes(64 << 20))
    real = os.fstat
    monkeypatch.setattr(directory.os, "fstat", lambda fd: os.stat_result((*real(fd)[:6], 0, *real(fd)[7:])))
    before = _bytes_read()
    with pytest.raises(ValueError, match="more than 1048576 bytes"):
        ex.store.read(f"replica-1/{20:010d}.json", MAX_MANIFEST_BYTES)
    assert _bytes_read() - before <= MAX_MANIFEST_BYTES + 1 + (64 << 10)  # the bound, and a buffer
    assert ex.load(1, 20) is None and ex.rejected(1) == 1
