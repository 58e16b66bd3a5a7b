"""Exchanges: directory (atomic, checksummed, pruned), fsspec URLs, in-memory."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from exchanges import newest
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from codistill.exchange import (
    BackgroundExchange,
    DirectoryExchange,
    Exchange,
    MemoryExchange,
    make_exchange,
    state_nbytes,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(7, 3, generator=g),
        "head.bias": torch.randn(5, generator=g).half(),
        "counter": torch.tensor([seed, 2, 3], dtype=torch.int64),
    }


def _assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def _folder(root, replica: int = 0) -> Path:
    return Path(root) / f"replica-{replica}"


def _weights(root, step: int, replica: int = 0) -> Path:
    return _folder(root, replica) / f"{step:010d}.safetensors"


def _manifest(root, step: int, replica: int = 0) -> Path:
    return _folder(root, replica) / f"{step:010d}.json"


# -- directory exchange ---------------------------------------------------------------------

def test_directory_roundtrip(tmp_path):
    ex = DirectoryExchange(str(tmp_path))
    meta = {"replica": 0, "model": {"name": "lstm", "hidden_dim": 32}, "note": "ünïcode"}
    nbytes = ex.publish(0, 50, _state(1), meta)

    assert ex.versions(0) == [50] and ex.versions(1) == []
    pub = ex.load(0, 50)
    assert (pub.replica, pub.step, pub.nbytes) == (0, 50, state_nbytes(_state(1)))  # tensor bytes
    _assert_state_equal(pub.state, _state(1))
    assert pub.meta == meta
    assert newest(ex, 0).step == 50 and newest(ex, 1) is None

    data = _weights(tmp_path, 50).read_bytes()
    assert len(data) == nbytes
    manifest = json.loads(_manifest(tmp_path, 50).read_text())
    assert manifest["step"] == 50 and manifest["replica"] == 0
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["weights"] == "0000000050.safetensors"
    assert manifest["meta"] == meta


def test_file_url_is_a_local_directory(tmp_path):
    ex = make_exchange(f"file://{tmp_path}")
    assert isinstance(ex, DirectoryExchange)
    ex.publish(2, 7, _state(3), {})
    assert _weights(tmp_path, 7, replica=2).is_file()
    _assert_state_equal(newest(DirectoryExchange(str(tmp_path)), 2).state, _state(3))


def test_unfinished_files_are_invisible(tmp_path):
    ex = DirectoryExchange(str(tmp_path))
    ex.publish(0, 10, _state(1), {})
    folder = _folder(tmp_path)
    data = _weights(tmp_path, 10).read_bytes()
    # A writer caught mid-way: temporary files, and weights whose manifest is not written yet.
    (folder / f".0000000020.safetensors.{uuid.uuid4().hex}.tmp").write_bytes(data[:40])
    (folder / f".0000000020.json.{uuid.uuid4().hex}.tmp").write_bytes(b'{"form')
    save_file(_state(2), str(_weights(tmp_path, 30)))
    (folder / "0000000040.json.partial").write_bytes(b"{")
    assert ex.versions(0) == [10]
    assert newest(ex, 0).step == 10
    _assert_state_equal(newest(ex, 0).state, _state(1))
    assert ex.load(0, 30) is None


def test_concurrent_reader_only_sees_complete_versions(tmp_path):
    """A writer publishes many versions while a reader keeps looking at the folder and loading."""
    writer_ex = DirectoryExchange(str(tmp_path), keep=2)
    reader_ex = DirectoryExchange(str(tmp_path), keep=2)
    n_versions, size = 30, 1 << 18  # 1 MiB of float32 per version

    def state(step: int) -> dict[str, torch.Tensor]:
        return {"w": torch.full((size,), float(step)), "step": torch.tensor([step])}

    weights_size = len(st_save(state(0)))  # every version has the same byte size
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for step in range(1, n_versions + 1):
                writer_ex.publish(0, step, state(step), {"step": step})
                time.sleep(0.002)  # let the reader interleave on any scheduler
        except BaseException as e:  # surfaced by the main thread
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen, files_checked = [], 0
    try:
        while not done.is_set() or not seen:
            # Every file under its final name is complete.
            for path in _folder(tmp_path).glob("[0-9]*"):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:  # pruned meanwhile
                    continue
                if path.suffix == ".json":
                    assert json.loads(data)["step"] == int(path.stem)
                else:
                    assert len(data) == weights_size, path.name
                files_checked += 1
            pub = newest(reader_ex, 0)
            if pub is None:
                continue
            assert pub.state["w"].shape == (size,)
            assert torch.all(pub.state["w"] == float(pub.step))
            assert int(pub.state["step"]) == pub.step == pub.meta["step"]
            seen.append(pub.step)
    finally:
        thread.join()
    assert not errors, errors
    assert newest(reader_ex, 0).step == n_versions
    assert len(set(seen)) > 1 and files_checked > 0


def test_corrupted_weights_are_skipped(tmp_path, caplog):
    ex = DirectoryExchange(str(tmp_path))
    ex.publish(0, 10, _state(1), {})
    ex.publish(0, 20, _state(2), {})
    path = _weights(tmp_path, 20)
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # flip the last tensor bytes; same length
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert ex.load(0, 20) is None
    assert "checksum" in caplog.text
    assert ex.versions(0) == [10, 20]
    pub = newest(ex, 0)
    assert pub.step == 10
    _assert_state_equal(pub.state, _state(1))


def test_swapped_valid_weights_fail_the_checksum(tmp_path):
    """A readable safetensors file that is not the one the manifest describes is rejected."""
    ex = DirectoryExchange(str(tmp_path))
    ex.publish(0, 10, _state(1), {})
    ex.publish(0, 20, _state(2), {})
    save_file(_state(3), str(_weights(tmp_path, 20)))
    assert ex.load(0, 20) is None
    assert newest(ex, 0).step == 10


def test_truncated_weights_are_skipped(tmp_path):
    ex = DirectoryExchange(str(tmp_path))
    ex.publish(0, 10, _state(1), {})
    ex.publish(0, 20, _state(2), {})
    path = _weights(tmp_path, 20)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert newest(ex, 0).step == 10


def test_every_kept_version_is_listed_and_loads(tmp_path):
    ex = DirectoryExchange(str(tmp_path), keep=5)
    for step in (10, 20, 30):  # (a step after the one published is removed: see _prune)
        ex.publish(1, step, _state(step), {"step": step})
    assert ex.versions(1) == [10, 20, 30]
    for step in (10, 20, 30):
        pub = ex.load(1, step)
        assert pub.step == step and pub.meta == {"step": step}
        _assert_state_equal(pub.state, _state(step))
    assert ex.load(1, 25) is None


@pytest.mark.parametrize("keep", [2, 3])
def test_pruning_keeps_the_newest_versions(tmp_path, keep):
    ex = DirectoryExchange(str(tmp_path), keep=keep)
    for step in range(5, 35, 5):
        ex.publish(0, step, _state(step), {})
    ex.publish(1, 5, _state(0), {})
    newest = list(range(5, 35, 5))[-keep:]
    assert ex.versions(0) == newest
    names = sorted(p.name for p in _folder(tmp_path).iterdir())
    assert names == sorted(f"{s:010d}.{ext}" for s in newest for ext in ("json", "safetensors"))
    assert ex.versions(1) == [5]  # other replicas are untouched
    _assert_state_equal(ex.load(0, newest[0]).state, _state(newest[0]))


@pytest.mark.parametrize(
    "manifest",
    [
        b"{not json",
        b"\xff\xfe garbage",
        json.dumps({"format": "codistill-exchange/1", "step": 10}).encode(),  # no weights field
        "wrong step",
        "other format",
        "escaping weights",
    ],
    ids=["not-json", "not-utf8", "no-weights", "wrong-step", "other-format", "escaping-weights"],
)
def test_a_bad_manifest_is_skipped(tmp_path, manifest):
    ex = DirectoryExchange(str(tmp_path))
    ex.publish(0, 10, _state(1), {})
    ex.publish(0, 20, _state(2), {})
    good = json.loads(_manifest(tmp_path, 20).read_text())
    if manifest == "wrong step":
        manifest = json.dumps({**good, "step": 10}).encode()
    elif manifest == "other format":
        manifest = json.dumps({**good, "format": "something-else/9"}).encode()
    elif manifest == "escaping weights":
        manifest = json.dumps({**good, "weights": "../replica-0/0000000010.safetensors"}).encode()
    _manifest(tmp_path, 20).write_bytes(manifest)
    assert ex.load(0, 20) is None
    assert newest(ex, 0).step == 10


@pytest.mark.parametrize("manifest", ["no sha256", "json list", "json null"])
def test_a_structurally_bad_manifest_is_skipped(tmp_path, manifest):
    ex = DirectoryExchange(str(tmp_path))
    ex.publish(0, 10, _state(1), {})
    ex.publish(0, 20, _state(2), {})
    good = json.loads(_manifest(tmp_path, 20).read_text())
    body = {"no sha256": {k: v for k, v in good.items() if k != "sha256"},
            "json list": [good], "json null": None}[manifest]
    _manifest(tmp_path, 20).write_text(json.dumps(body))
    assert ex.load(0, 20) is None
    assert newest(ex, 0).step == 10


def test_directory_keep_below_two_raises(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        DirectoryExchange(str(tmp_path), keep=1)


def test_fsspec_memory_url(tmp_path):
    url = f"memory://codistill-test-{uuid.uuid4().hex}"
    ex = make_exchange(url, keep=2)
    assert isinstance(ex, DirectoryExchange)
    fs, root = fsspec.core.url_to_fs(url)
    try:
        for step in (1, 2, 3):
            ex.publish(0, step, _state(step), {"step": step})
        assert ex.versions(0) == [2, 3]
        pub = newest(ex, 0)
        assert pub.step == 3 and pub.meta == {"step": 3}
        _assert_state_equal(pub.state, _state(3))
        # Corrupt the newest weights in the object store: the reader falls back.
        path = f"{root.rstrip('/')}/replica-0/0000000003.safetensors"
        data = bytearray(fs.cat_file(path))
        data[-1] ^= 0xFF
        fs.pipe_file(path, bytes(data))
        assert newest(ex, 0).step == 2
        # Another client sees the same store.
        assert DirectoryExchange(url).versions(0) == [2, 3]
    finally:
        fs.rm(root, recursive=True)


# -- memory exchange ------------------------------------------------------------------------

def test_memory_roundtrip_copies_the_state():
    ex = MemoryExchange()
    state = _state(1)
    nbytes = ex.publish(0, 5, state, {"model": {"name": "lstm"}})
    assert nbytes == sum(t.numel() * t.element_size() for t in state.values())
    state["embed.weight"].add_(1.0)  # the publisher keeps training
    pub = ex.load(0, 5)
    _assert_state_equal(pub.state, _state(1))
    assert (pub.replica, pub.step, pub.meta, pub.nbytes) == (0, 5, {"model": {"name": "lstm"}}, nbytes)
    assert newest(ex, 0).step == 5 and newest(ex, 1) is None and ex.load(0, 6) is None


def test_memory_keep():
    ex = MemoryExchange(keep=2)
    for step in (1, 2, 3, 4):
        ex.publish(0, step, _state(step), {})
    ex.publish(1, 9, _state(9), {})
    assert ex.versions(0) == [3, 4] and ex.versions(1) == [9]
    assert ex.load(0, 2) is None
    _assert_state_equal(newest(ex, 0).state, _state(4))
    with pytest.raises(ValueError, match="keep"):
        MemoryExchange(keep=0)


def test_make_exchange(tmp_path):
    mem = MemoryExchange()
    assert make_exchange(mem) is mem
    assert isinstance(make_exchange("memory"), MemoryExchange)
    assert isinstance(make_exchange(str(tmp_path)), DirectoryExchange)
    assert make_exchange(str(tmp_path), keep=4).keep == 4
    with pytest.raises(ValueError, match="exchange"):
        make_exchange("")
    assert issubclass(DirectoryExchange, Exchange)


# -- what every exchange offers -------------------------------------------------------------

def test_durable_flush_and_wait_seconds(tmp_path):
    mem, directory = MemoryExchange(), DirectoryExchange(str(tmp_path))
    assert mem.durable is False and directory.durable is True
    for ex in (mem, directory):
        assert ex.wait_seconds == 0.0
        ex.publish(0, 5, _state(5), {})
        ex.flush()  # nothing in flight: returns at once, changes nothing
        assert ex.versions(0) == [5] and ex.wait_seconds == 0.0
    assert BackgroundExchange(MemoryExchange()).durable is False
    assert BackgroundExchange(DirectoryExchange(str(tmp_path / "b"))).durable is True


def test_background_exchange_writes_in_order_on_one_thread(tmp_path):
    release = threading.Event()
    writers: list[str] = []

    class Slow(DirectoryExchange):
        def publish(self, replica, step, state, meta):
            writers.append(threading.current_thread().name)
            assert release.wait(10)
            return super().publish(replica, step, state, meta)

    ex = BackgroundExchange(Slow(str(tmp_path), keep=3))
    state = _state(1)
    nbytes = ex.publish(0, 10, state, {"step": 10})
    assert nbytes == sum(t.numel() * t.element_size() for t in state.values())  # returns at once
    assert ex.versions(0) == []  # still being written
    timer = threading.Timer(0.05, release.set)
    timer.start()
    ex.publish(0, 20, _state(2), {"step": 20})  # waits for the write of step 10 first
    timer.join()
    ex.flush()
    assert ex.versions(0) == [10, 20]
    _assert_state_equal(ex.load(0, 10).state, _state(1))
    _assert_state_equal(newest(ex, 0).state, _state(2))
    assert ex.wait_seconds >= 0.04  # the training thread waited for the write in flight
    assert all(name.startswith("codistill-publish") for name in writers) and len(writers) == 2
    ex.clear(0)
    assert ex.versions(0) == []
    ex.close()


def test_a_failed_background_write_is_a_counted_warning(tmp_path, caplog):
    class Flaky(MemoryExchange):
        fail = True

        def publish(self, replica, step, state, meta):
            if self.fail:
                raise OSError(28, "No space left on device")
            return super().publish(replica, step, state, meta)

    inner = Flaky()
    ex = BackgroundExchange(inner)
    with caplog.at_level(logging.WARNING, logger="codistill"):
        ex.publish(0, 10, _state(1), {})
        ex.flush()  # no exception: training goes on
    assert ex.publish_failures == 1 and "publishing step 10 failed" in caplog.text
    inner.fail = False
    ex.publish(0, 20, _state(2), {})  # the next exchange is the retry
    ex.flush()
    assert ex.versions(0) == [20] and ex.publish_failures == 1
    ex.close()


def test_refresh_takes_the_version_prefetched_off_the_step(tmp_path):
    """Between exchanges a background thread reads a peer's new version; the refresh then
    only copies it into the teacher. A version published again with other content is read
    again (the prefetched copy no longer matches the exchange)."""
    import time

    from torch import nn

    from codistill import Codistiller
    from codistill.exchange import DirectoryExchange

    torch.manual_seed(0)
    models = [nn.Linear(8, 4), nn.Linear(8, 4)]
    writer = Codistiller(models[1], DirectoryExchange(str(tmp_path)), replica=1, num_replicas=2,
                         exchange_every=5)
    exchange = DirectoryExchange(str(tmp_path))
    reader = Codistiller(models[0], exchange, replica=0, num_replicas=2, exchange_every=5)
    assert reader.picker.prefetcher is not None
    reads = []
    load = exchange.load
    exchange.load = lambda *a, **k: (reads.append(a[:2]), load(*a, **k))[1]
    reader.refresh(5)  # nothing published yet; starts watching
    writer.publish(5)

    def prefetched(step: int) -> bool:
        deadline = time.time() + 10
        while time.time() < deadline:
            ready = reader.picker.prefetcher._ready
            if ready.get(1) is not None and ready[1].step == step:
                return True
            time.sleep(0.02)
        return False

    assert prefetched(5)
    assert reads == [(1, 5)]  # read by the prefetch thread
    assert reader.refresh(10) == {1: 5}
    assert reads == [(1, 5)]  # the refresh read nothing more
    assert torch.equal(reader.teachers[1].module.weight, models[1].weight)
    with torch.no_grad():
        models[1].weight.add_(1.0)
    writer.publish(10)
    assert prefetched(10)
    with torch.no_grad():
        models[1].weight.add_(1.0)
    writer.publish(10)  # the same step again, other content (a restarted peer)
    reader.refresh(15)
    assert reads[-1] == (1, 10) and len(reads) == 3  # read again by the refresh itself
    assert torch.equal(reader.teachers[1].module.weight, models[1].weight)
    reader.close()
    writer.close()


def test_tied_weights_publish_to_a_directory(tmp_path):
    """A model whose output layer shares the embedding's weight (a language model with tied
    weights) publishes through a directory exchange object, written at once."""
    from codistill import Codistiller
    from codistill.exchange import DirectoryExchange
    from codistill.models import build_model

    spec = {"name": "lstm", "vocab_size": 50, "embed_dim": 16, "hidden_dim": 16, "tie_weights": True}
    models = [build_model(spec), build_model(spec)]
    assert models[0].head.weight is models[0].embed.weight
    cds = [Codistiller(m, DirectoryExchange(str(tmp_path)), replica=r, num_replicas=2, exchange_every=1,
                       model_spec=spec) for r, m in enumerate(models)]
    cds[1].publish(1)
    assert cds[0].refresh(1) == {1: 1}
    teacher = cds[0].teachers[1].module
    assert torch.equal(teacher.embed.weight, models[1].embed.weight)
    assert torch.equal(teacher.head.weight, models[1].head.weight)


def test_collective_broadcast_keeps_state_order_dtypes_and_values():
    """The collective sends a state by its Header (header_of: name -> (dtype, shape), in state
    order): a one-rank group gets every tensor back in order, dtype and value."""
    import torch.distributed as dist

    from codistill.exchange.base import Published, header_of
    from codistill.exchange.collective import broadcast_state, share_teachers

    state = {"b": torch.randn(3, 2), "a": torch.arange(5), "c": torch.randn(4).half()}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        got = broadcast_state(state, header_of(state), 0, dist.group.WORLD, "cpu")
        shared = share_teachers({1: Published(1, 7, state, {"m": 1}, 0)}, True, 0, dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    assert list(got) == list(state) and header_of(got) == header_of(state)
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert shared[1].step == 7 and shared[1].state is state
