"""The exchange on an object store through S3's real protocol: s3fs talking to a local moto
server that checks every request's signature (the fixtures s3_server, s3_env, s3_url and
s3_proxy: conftest.py and s3server.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import sys
import threading
import time

import pytest
import torch

from codistill._extras import MissingExtra
from codistill.cli import main
from codistill.config import from_dict
from codistill.engine import run
from codistill.exchange import BackgroundExchange, DirectoryExchange, make_exchange, state_nbytes
from codistill.exchange.directory import OBJECT_STORE_POLL, _FsspecStore
from codistill.exchange.prefetch import Prefetcher
from codistill.runlog import read_metrics


def _state(step: int, n: int = 64) -> dict[str, torch.Tensor]:
    return {"w": torch.full((n,), float(step)), "b": torch.arange(4, dtype=torch.int64) + step}


def _keys(server, url: str) -> list[str]:
    """The object keys under ``url`` (an s3:// prefix), as S3 lists them."""
    prefix = url.removeprefix(f"s3://{server.bucket}/")
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
    return sorted(o["Key"].removeprefix(prefix + "/") for page in pages for o in page.get("Contents", []))


def _object(server, url: str, rel: str) -> tuple[str, str]:
    """(bucket, key) of ``rel`` under ``url``."""
    return server.bucket, f"{url.removeprefix(f's3://{server.bucket}/')}/{rel}"


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(_FsspecStore, "BACKOFF", 0.01)


def test_publish_list_and_load_through_s3(s3_env, s3_url):
    writer = make_exchange(s3_url, keep=3)
    assert isinstance(writer, DirectoryExchange)
    for step in (10, 20, 30):
        writer.publish(0, step, _state(step), {"step": step})
    assert _keys(s3_env, s3_url) == [f"replica-0/00000000{s}.{ext}" for s in (10, 20, 30)
                                     for ext in ("json", "safetensors")]
    reader = DirectoryExchange(s3_url)  # another client of the same bucket
    assert reader.versions(0) == [10, 20, 30] and reader.versions(1) == []
    published = reader.load(0, 30)
    assert published.step == 30 and published.meta == {"step": 30}
    assert all(torch.equal(published.state[k], v) for k, v in _state(30).items())
    bucket, key = _object(s3_env, s3_url, "replica-0/0000000030.safetensors")
    stored = s3_env.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert published.ident == hashlib.sha256(stored).hexdigest()
    assert published.nbytes == state_nbytes(_state(30)) < len(stored)  # tensor bytes, not the file's


def test_a_reader_sees_versions_published_after_it_listed(s3_url):
    """s3fs caches listings for ever by default: the exchange reads past that cache."""
    writer, reader = DirectoryExchange(s3_url), DirectoryExchange(s3_url)
    writer.publish(0, 10, _state(10), {})
    assert reader.versions(0) == [10] and reader.load(0, 10) is not None
    writer.publish(0, 20, _state(20), {})
    assert reader.versions(0) == [10, 20]
    assert reader.candidates(0)[0] == 20 and reader.load(0, 20).step == 20


def test_a_corrupted_object_is_rejected_and_the_reader_goes_on(s3_env, s3_url, caplog):
    writer, reader = DirectoryExchange(s3_url), DirectoryExchange(s3_url)
    for step in (10, 20):
        writer.publish(0, step, _state(step), {})
    bucket, key = _object(s3_env, s3_url, "replica-0/0000000020.safetensors")
    client = s3_env.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF  # same size, one tensor byte flipped: only the checksum catches it
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    assert reader.candidates(0) == [20, 10]  # as a refresh reads: list, then load the newest
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert reader.load(0, 20) is None
    assert "checksum mismatch" in caplog.text and f"{s3_url}/replica-0/0000000020" in caplog.text
    assert reader.rejected(0) == 1 and reader.candidates(0) == [10]  # skipped from now on
    assert reader.load(0, 10).step == 10
    # Published again at once (a resumed replica): a new ETag, read again within the same second.
    writer.publish(0, 20, _state(20), {})
    assert reader.candidates(0) == [20, 10] and reader.load(0, 20).step == 20
    writer.publish(0, 30, _state(30), {})
    assert reader.candidates(0)[0] == 30 and reader.load(0, 30).step == 30
    assert reader.rejected(0) == 1


def test_keep_prunes_the_bucket(s3_env, s3_url):
    ex = DirectoryExchange(s3_url, keep=2)
    for step in (10, 20, 30, 40):
        ex.publish(1, step, _state(step), {})
    assert ex.versions(1) == [30, 40]
    assert _keys(s3_env, s3_url) == [f"replica-1/00000000{s}.{ext}" for s in (30, 40)
                                     for ext in ("json", "safetensors")]
    ex.publish(1, 35, _state(35), {})  # a resume from step 35: the version after it is not this run's
    assert ex.versions(1) == [30, 35]
    ex.clear(1)
    assert _keys(s3_env, s3_url) == []


def test_a_reader_racing_a_writer_never_loads_a_partial_version(s3_url):
    """A writer publishes versions back to back (the oldest pruned as it goes) while a reader
    loads the newest again and again: every load is complete and verified, none rejected,
    though the reader did list weights whose manifest was not written yet."""
    writer, reader = DirectoryExchange(s3_url, keep=2), DirectoryExchange(s3_url, keep=2)
    steps, loaded, errors, half_written = range(1, 31), [], [], []
    done = threading.Event()

    def write() -> None:
        try:
            for step in steps:
                writer.publish(0, step, _state(step, n=4096), {"step": step})
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            done.set()

    def read() -> None:
        try:
            while not done.is_set():
                names = reader.store.list("replica-0")
                half_written.extend(n for n in names if n.endswith(".safetensors")
                                    and f"{n[:10]}.json" not in names)
                newest = next(iter(reader.candidates(0)), None)
                published = None if newest is None else reader.load(0, newest)
                if published is not None:
                    assert published.meta == {"step": published.step} == {"step": newest}
                    assert all(torch.equal(published.state[k], v)
                               for k, v in _state(newest, n=4096).items())
                    loaded.append(newest)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert half_written  # the race was run: weights listed before their manifest
    assert reader.rejected(0) == 0  # never a half-written version, never a false rejection
    assert len(set(loaded)) >= 3 and loaded == sorted(loaded)
    assert reader.versions(0) == [29, 30] and reader.load(0, 30).step == 30


def test_a_prefetcher_lists_an_object_store_once_a_second(s3_url, s3_proxy):
    """Each listing is a billed request: between exchanges a prefetcher lists a peer every
    OBJECT_STORE_POLL seconds (a local directory: every 0.2 s), and still takes a new version."""
    ex = DirectoryExchange(s3_url, storage_options={"endpoint_url": s3_proxy.url})
    assert ex.poll_seconds == OBJECT_STORE_POLL == 1.0 and BackgroundExchange(ex).poll_seconds == 1.0
    prefetcher = Prefetcher(ex)
    ex.publish(1, 10, _state(10), {})
    listings = len(s3_proxy.statuses("GET"))
    prefetcher.start({1: None}, lambda peer: None)
    time.sleep(2.5)
    prefetcher.stop()
    gets = [path for method, path, _ in s3_proxy.faults.served if method == "GET"][listings:]
    assert 2 <= sum("list-type=2" in path for path in gets) <= 4
    assert prefetcher.take(1, 10, ex.ident(1, 10)).step == 10


def _through(proxy) -> dict:
    """Storage options reaching the server through ``proxy``, the SDK's own retries off."""
    return {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}}


def test_503s_from_the_server_are_retried(s3_url, s3_proxy, fast_retries):
    ex = DirectoryExchange(s3_url, storage_options=_through(s3_proxy))
    s3_proxy.fail("PUT", 2)
    ex.publish(0, 10, _state(10), {})
    assert s3_proxy.statuses("PUT") == [503, 503, 200, 200]  # the weights twice refused, then both land
    gets, heads = len(s3_proxy.statuses("GET")), len(s3_proxy.statuses("HEAD"))
    s3_proxy.fail("GET", 2)
    s3_proxy.fail("HEAD", 1)
    published = ex.load(0, 10)
    assert published is not None and torch.equal(published.state["w"], _state(10)["w"])
    assert s3_proxy.statuses("GET")[gets:gets + 3] == [503, 503, 206]  # then the range read
    assert s3_proxy.statuses("HEAD")[heads:heads + 2] == [503, 200]
    assert ex.rejected(0) == 0
    s3_proxy.fail("GET", 1)  # a listing (GET ?list-type=2) too
    assert ex.versions(0) == [10] and s3_proxy.statuses("GET")[-2:] == [503, 200]


def test_a_store_failing_past_the_retries(s3_url, s3_proxy, fast_retries, caplog):
    """Publishing raises (the run counts it and goes on); reading skips the version for this
    refresh without rejecting it, and loads it once the store answers again."""
    ex = DirectoryExchange(s3_url, storage_options=_through(s3_proxy))
    ex.publish(0, 10, _state(10), {})
    s3_proxy.fail("PUT", _FsspecStore.RETRIES + 1)
    with pytest.raises(OSError) as failed:
        ex.publish(0, 20, _state(20), {})
    assert failed.value.errno == errno.EBUSY and s3_proxy.statuses("PUT")[-4:] == [503] * 4
    s3_proxy.fail("GET", _FsspecStore.RETRIES + 1)  # the manifest's every try
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert ex.load(0, 10) is None
    assert "tried again at the next refresh" in caplog.text and ex.rejected(0) == 0
    assert ex.candidates(0) == [10] and ex.load(0, 10).step == 10


def test_permanent_errors_are_not_retried(monkeypatch):
    """Only errors that may pass are retried: a refused credential or a missing object fails
    at once."""
    monkeypatch.setattr(_FsspecStore, "BACKOFF", 0.0)
    calls = []

    def failing(error):
        def call():
            calls.append(error)
            raise error
        return call

    store = _FsspecStore("memory://codistill-retries")
    for error, tries in [(PermissionError("denied"), 1), (FileNotFoundError("gone"), 1),
                         (OSError(errno.EINVAL, "bad request"), 1), (OSError(errno.EBUSY, "503"), 4),
                         (OSError(errno.EREMOTEIO, "500"), 4), (TimeoutError("slow"), 4)]:
        calls.clear()
        with pytest.raises(type(error)):
            store._retry(failing(error))
        assert len(calls) == tries, error


def test_without_s3fs_an_s3_exchange_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"exchange 's3://b/p' needs s3fs: pip install 'codistill\[s3\]'"):
        DirectoryExchange("s3://b/p")


def test_credentials_come_from_the_aws_variables(s3_env, s3_url, monkeypatch):
    DirectoryExchange(s3_url).publish(0, 10, _state(10), {})  # the fixture's key, from the environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ValueError) as refused:
        DirectoryExchange(s3_url)
    message = str(refused.value)
    assert s3_url in message and "access denied" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "signature" in message.lower()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret)
    assert DirectoryExchange(s3_url).versions(0) == [10]


def test_a_wrong_secret_is_one_clear_error_of_the_cli(s3_env, s3_url, tiny_config_factory, tmp_path,
                                                      capsys, monkeypatch):
    values = tiny_config_factory(name="s3", steps=4)
    values["codistill"]["exchange"] = s3_url
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(values))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"exchange {s3_url!r}: access denied" in err and "Traceback" not in err
    assert err.count("codistill: error:") == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_replicas_codistill_through_s3(s3_env, s3_url, tiny_config_factory, tmp_path):
    """A real run: both replicas publish to the bucket and train against each other's versions
    read back from it."""
    values = tiny_config_factory(name="s3", steps=20)
    values["codistill"] = {**values["codistill"], "exchange": s3_url, "burn_in": 5, "exchange_every": 5}
    cfg = from_dict(values)
    summary = run(cfg, str(tmp_path / "run"), progress=False)
    assert summary["end"] == 20 and sum(summary["publish_failures"].values()) == 0
    keys = set(_keys(s3_env, s3_url))
    for replica in (0, 1):
        assert {f"replica-{replica}/0000000020.{ext}" for ext in ("json", "safetensors")} <= keys
    rows = [r for r in read_metrics(str(tmp_path / "run")) if r["kind"] == "train"]
    last = {r["replica"]: r for r in rows}
    assert last[0]["teacher_versions"] == {"1": 20} and last[1]["teacher_versions"] == {"0": 20}
