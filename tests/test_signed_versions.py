"""Signed versions (exchange/signing.py): with a shared key every manifest carries an
HMAC-SHA256 and a reader with the key rejects unsigned, wrongly signed or altered versions
before a byte of their weights is read; a run id keeps runs apart; without a key a planted
far-future step is skipped instead of taking a teacher over. Real files, real exchanges."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CONFIG
from exchanges import newest

from codistill.codistiller import Codistiller, Newest, Trust
from codistill.exchange import DirectoryExchange, signing
from codistill.exchange.signing import ExchangeKeyError, Signer, key_id, load_keys
from codistill.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"name": "lstm", "vocab_size": 20, "embed_dim": 8, "hidden_dim": 12}
KEY, OLD, OTHER = "11" * 32, "22" * 32, "33" * 32  # hex, 32 bytes each
RUN = "run-a"


def _exchange(root: Path, keys: str | None = None, run_id: str | None = RUN, every: int | None = None
              ) -> DirectoryExchange:
    ex = DirectoryExchange(str(root))
    signing.attach(ex, Signer(load_keys(keys) if keys else [], run_id, every))
    return ex


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(SPEC).state_dict()


def _manifest(root: Path, step: int, replica: int = 1) -> Path:
    return root / f"replica-{replica}" / f"{step:010d}.json"


class Spy:
    """A store that records every access to a weights file (and passes everything on)."""

    def __init__(self, store) -> None:
        self.store, self.touched = store, []

    def __getattr__(self, name):
        fn = getattr(self.store, name)

        def call(rel, *args):
            if rel.endswith(".safetensors"):
                self.touched.append((name, rel))
            return fn(rel, *args)

        return call


def _spied(ex: DirectoryExchange) -> Spy:
    ex.store = Spy(ex.store)
    return ex.store


def _rejected(ex: DirectoryExchange, step: int, caplog, reason: str, replica: int = 1) -> None:
    """``step`` is rejected twice without touching its weights, with one warning naming ``reason``."""
    spy = _spied(ex)
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert ex.load(replica, step) is None and ex.load(replica, step) is None
    assert spy.touched == []
    assert caplog.text.count(reason) == 1, caplog.text
    assert signing.signer_of(ex).rejected == 1


def test_a_signed_version_is_read_with_the_key(tmp_path):
    state = _state()
    _exchange(tmp_path, KEY).publish(1, 10, state, {"model": SPEC})
    manifest = json.loads(_manifest(tmp_path, 10).read_text())
    assert manifest["run_id"] == RUN and manifest["kid"] == key_id(bytes.fromhex(KEY))
    assert len(manifest["hmac"]) == 64 and KEY not in _manifest(tmp_path, 10).read_text()
    got = _exchange(tmp_path, KEY).load(1, 10)
    assert got is not None and got.meta == {"model": SPEC}
    assert all(torch.equal(got.state[k], v) for k, v in state.items())


def test_an_unsigned_version_is_rejected_before_its_weights_are_read(tmp_path, caplog):
    _exchange(tmp_path, KEY).publish(1, 10, _state(0), {})
    _exchange(tmp_path).publish(1, 20, _state(1), {})  # planted by a writer without the key
    reader = _exchange(tmp_path, KEY)
    _rejected(reader, 20, caplog, "unsigned version")
    assert newest(reader, 1).step == 10  # the newest valid version is used


def test_a_version_signed_with_another_key_is_rejected(tmp_path, caplog):
    _exchange(tmp_path, OTHER).publish(1, 10, _state(), {})
    _rejected(_exchange(tmp_path, KEY), 10, caplog, "signed with a key this reader does not have")


def _tamper_step(root: Path, m: dict) -> int:  # the version moved to step 20, its step edited to fit
    m["step"] = 20
    _manifest(root, 20).write_text(json.dumps(m))
    return 20


def _tamper_weights(root: Path, m: dict) -> int:  # other valid weights, their checksum and size edited in
    other = DirectoryExchange(str(root / "elsewhere"))
    other.publish(1, 10, _state(1), {})
    shutil.copy(root / "elsewhere" / "replica-1" / m["weights"], root / "replica-1" / m["weights"])
    theirs = json.loads(_manifest(root / "elsewhere", 10).read_text())
    m["sha256"], m["nbytes"] = theirs["sha256"], theirs["nbytes"]
    _manifest(root, 10).write_text(json.dumps(m))
    return 10


def _edit(field: str, value):
    def tamper(root: Path, m: dict) -> int:
        m[field] = value
        _manifest(root, 10).write_text(json.dumps(m))
        return 10

    return tamper


@pytest.mark.parametrize("tamper, reason", [
    (_tamper_step, "bad signature"),
    (_tamper_weights, "bad signature"),
    (_edit("replica", 2), "bad signature"),
    (_edit("run_id", "run-b"), "bad signature"),
    (_edit("meta", {"model": {**SPEC, "hidden_dim": 4000}}), "bad signature"),
    (_edit("hmac", "0" * 64), "bad signature"),
    (_edit("kid", key_id(bytes.fromhex(OLD))), "bad signature"),  # a key the reader has, not the signer's
], ids=["step", "weights-and-sha256", "replica", "run_id", "meta", "hmac", "kid"])
def test_an_altered_signed_manifest_is_rejected(tmp_path, caplog, tamper, reason):
    _exchange(tmp_path, KEY).publish(1, 10, _state(), {"model": SPEC})
    step = tamper(tmp_path, json.loads(_manifest(tmp_path, 10).read_text()))
    _rejected(_exchange(tmp_path, f"{KEY},{OLD}"), step, caplog, reason)


def test_a_signed_version_copied_to_another_replica_is_rejected(tmp_path, caplog):
    _exchange(tmp_path, KEY).publish(1, 10, _state(), {})
    shutil.copytree(tmp_path / "replica-1", tmp_path / "replica-2")
    _rejected(_exchange(tmp_path, KEY), 10, caplog, "signed for replica 1 step 10, found as replica 2",
              replica=2)


@pytest.mark.parametrize("keys", [None, KEY], ids=["unsigned", "signed"])
def test_a_version_of_another_run_is_rejected(tmp_path, caplog, keys):
    _exchange(tmp_path, keys, run_id="old-run").publish(1, 10, _state(), {})
    assert _exchange(tmp_path, keys, run_id=None).load(1, 10) is not None  # no run id: any run
    _rejected(_exchange(tmp_path, keys, run_id="new-run"), 10, caplog,
              "published by run 'old-run', this is run 'new-run'")


def test_a_version_without_a_run_id_is_rejected_by_a_reader_with_one(tmp_path, caplog):
    _exchange(tmp_path, run_id=None).publish(1, 10, _state(), {})
    _rejected(_exchange(tmp_path), 10, caplog, "published by run None")


def test_key_rotation_needs_no_stop(tmp_path, caplog):
    """Every replica first holds OLD; then NEW,OLD (NEW signs, both verify), one at a time;
    once all have it, OLD is dropped."""
    _exchange(tmp_path, OLD).publish(1, 10, _state(0), {})  # replica 1 not rotated yet
    _exchange(tmp_path, f"{KEY},{OLD}").publish(0, 10, _state(1), {})  # replica 0 rotated
    rotated, not_yet = _exchange(tmp_path, f"{KEY},{OLD}"), _exchange(tmp_path, f"{OLD},{KEY}")
    assert rotated.load(1, 10) is not None and not_yet.load(0, 10) is not None
    assert json.loads(_manifest(tmp_path, 10, 0).read_text())["kid"] == key_id(bytes.fromhex(KEY))
    _rejected(_exchange(tmp_path, KEY), 10, caplog, "signed with a key this reader does not have")


def test_a_key_file_that_changes_is_read_again_so_keys_rotate_without_a_restart(tmp_path, caplog):
    path = tmp_path / "exchange.key"
    path.write_text(OLD)
    path.chmod(0o600)
    writer, reader = (DirectoryExchange(str(tmp_path / "ex")) for _ in range(2))
    for ex in (writer, reader):
        signing.attach(ex, Signer(run_id=RUN, key_file=str(path)))
    writer.publish(1, 10, _state(), {})
    assert reader.load(1, 10) is not None
    path.write_text(f"{KEY} {OLD}")  # NEW signs, OLD still verifies
    writer.publish(1, 20, _state(), {})
    assert json.loads(_manifest(tmp_path / "ex", 20).read_text())["kid"] == key_id(bytes.fromhex(KEY))
    assert reader.load(1, 20) is not None and reader.load(1, 10) is not None
    path.write_text("half-written")  # unusable: the keys in use are kept
    with caplog.at_level(logging.WARNING, logger="codistill"):
        writer.publish(1, 30, _state(), {})
        assert reader.load(1, 30) is not None
    assert caplog.text.count("keeping the 2 key(s) in use") == 2 and KEY not in caplog.text
    late = tmp_path / "late.key"  # a replica whose copy of the key file has not been updated yet
    late.write_text(OLD)
    late.chmod(0o600)
    behind = DirectoryExchange(str(tmp_path / "ex"))
    signing.attach(behind, Signer(run_id=RUN, key_file=str(late)))
    spy = _spied(behind)
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert behind.load(1, 30) is None and behind.load(1, 30) is None
    assert caplog.text.count("read again if that key is added") == 1 and spy.touched == []
    late.write_text(f"{OLD},{KEY}")
    assert behind.load(1, 30) is not None  # not rejected for good: read once the key is there
    path.write_text(KEY)  # OLD retired
    writer.publish(1, 40, _state(), {})
    assert reader.load(1, 40) is not None


@pytest.mark.parametrize("value, message", [
    ("", "holds no key"),
    (" , ", "holds no key"),
    ("not-hex-at-all-" * 3, "key 1 is not hexadecimal"),
    ("ab" * 15, "key 1 has 15 bytes, fewer than 16 (32 hex digits"),
    (f"{KEY},zz", "key 2 is not hexadecimal"),
])
def test_a_bad_key_in_the_environment_is_one_clear_error(monkeypatch, value, message):
    monkeypatch.setenv("CODISTILL_EXCHANGE_KEY", value)
    with pytest.raises(ExchangeKeyError, match="CODISTILL_EXCHANGE_KEY") as e:
        load_keys()
    assert message in str(e.value) and (not value.strip(" ,") or value not in str(e.value))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "holds no key"),
    (b"ab" * 8 + b"\n", "key 1 has 8 bytes"),
    (b"\xff\xfe binary", "not a hexadecimal key"),
    ("fifo", "is not a regular file"),
])
def test_a_bad_key_file_is_one_clear_error_naming_it(tmp_path, content, message):
    path = tmp_path / "exchange.key"
    if content == "fifo":  # would block a plain open() forever
        os.mkfifo(path)
    elif content is not None:
        path.write_bytes(content)
        path.chmod(0o600)
    with pytest.raises(ExchangeKeyError, match=f"exchange key file {path}") as e:
        load_keys(key_file=str(path))
    assert message in str(e.value)
    with pytest.raises(ExchangeKeyError, match=f"exchange key file {path}"):  # the plug-in's argument
        Codistiller(torch.nn.Linear(2, 2), str(tmp_path / "ex"), trust=Trust(key_file=str(path)))


def test_a_key_file_others_can_read_is_warned_about(tmp_path, caplog):
    path = tmp_path / "exchange.key"
    path.write_text(f"{KEY}\n{OLD}\n")  # one key a line: the first signs
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert load_keys(key_file=str(path)) == [bytes.fromhex(KEY), bytes.fromhex(OLD)]
    assert "can be read by other users (mode 644): chmod 600 it" in caplog.text and KEY not in caplog.text
    with pytest.raises(ExchangeKeyError, match="not both"):
        load_keys(KEY, str(path))


def test_codistill_launch_refuses_a_bad_key_before_starting_a_replica(tmp_path, monkeypatch, capsys):
    from codistill.cli import main

    monkeypatch.setenv("CODISTILL_EXCHANGE_KEY", "ab" * 8)
    assert main(["launch", "--replicas", "2", "--exchange", str(tmp_path / "ex"), "--", sys.executable,
                 "-c", f"open({str(tmp_path / 'started')!r}, 'w')"]) == 2
    err = capsys.readouterr().err
    assert "CODISTILL_EXCHANGE_KEY: key 1 has 8 bytes" in err and "ab" * 8 not in err
    assert not (tmp_path / "started").exists()


def test_a_missing_key_file_in_the_config_fails_the_run_before_training(tmp_path, tiny_config, capsys):
    from codistill.cli import main

    tiny_config["codistill"].update(exchange=str(tmp_path / "ex"), exchange_key_file=str(tmp_path / "nope"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert f"exchange key file {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_plug_in_signs_with_its_key_argument_and_rejects_unsigned_peers(tmp_path, caplog):
    torch.manual_seed(0)
    student, peer = build_model(SPEC), build_model(SPEC)
    cd = Codistiller(student, str(tmp_path), replica=0, num_replicas=2, exchange_every=5, model_spec=SPEC,
                     trust=Trust(key=KEY, run_id=RUN), wait=Newest(prefetch=False))
    _exchange(tmp_path, KEY).publish(1, 10, peer.state_dict(), {"model": SPEC})
    _exchange(tmp_path).publish(1, 15, peer.state_dict(), {"model": SPEC})  # unsigned
    with caplog.at_level(logging.WARNING, logger="codistill"):
        cd.after_step(10)
        cd.after_step(15)
    cd.close()
    assert cd.teacher_versions() == {1: 10} and caplog.text.count("unsigned version") == 1
    assert "hmac" in json.loads(_manifest(tmp_path, 15, replica=0).read_text())


def test_from_env_takes_the_key_and_run_id_the_launcher_passes_on(tmp_path, monkeypatch):
    env = {"CODISTILL_REPLICA": "1", "CODISTILL_NUM_REPLICAS": "2", "CODISTILL_EXCHANGE": str(tmp_path),
           "CODISTILL_EXCHANGE_KEY": KEY, "CODISTILL_RUN_ID": RUN}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cd = Codistiller.from_env(torch.nn.Linear(2, 2), exchange_every=5)
    cd.after_step(5)
    cd.close()
    manifest = json.loads(_manifest(tmp_path, 5).read_text())
    assert (manifest["kid"], manifest["run_id"]) == (key_id(bytes.fromhex(KEY)), RUN)
    assert _exchange(tmp_path, KEY, run_id=RUN).load(1, 5) is not None


# -- no key -----------------------------------------------------------------------------
def test_without_a_key_versions_are_read_as_before(tmp_path):
    _exchange(tmp_path, run_id=None).publish(1, 10, _state(), {})
    manifest = json.loads(_manifest(tmp_path, 10).read_text())
    assert "hmac" not in manifest and "kid" not in manifest and manifest["run_id"] is None
    assert DirectoryExchange(str(tmp_path)).load(1, 10) is not None


def test_without_a_key_a_far_future_step_is_skipped_and_warned_about_once(tmp_path, caplog):
    """A planted step 1,000,000 next to the peer's honest versions: the reader keeps taking
    the honest ones (before: the planted version became the teacher for the rest of the run)."""
    torch.manual_seed(0)
    student, peer = build_model(SPEC), build_model(SPEC)
    cd = Codistiller(student, str(tmp_path), replica=0, num_replicas=2, exchange_every=5, model_spec=SPEC)
    honest = _exchange(tmp_path, run_id=None)
    honest.publish(1, 10, peer.state_dict(), {"model": SPEC})
    _exchange(tmp_path, run_id=None).publish(1, 1_000_000, _state(1), {"model": SPEC})  # planted
    with caplog.at_level(logging.WARNING, logger="codistill"):
        cd.after_step(10)
        assert cd.teacher_versions() == {1: 10}
        honest.publish(1, 15, peer.state_dict(), {"model": SPEC})
        cd.after_step(15)
        assert cd.teacher_versions() == {1: 15}
        cd.after_step(20)  # nothing newer that is plausible: keeps 15
    cd.close()
    assert cd.teacher_versions() == {1: 15}
    assert caplog.text.count("step 1000000 is more than 10000 steps ahead") == 1, caplog.text
    assert signing.signer_of(cd.exchange.inner).skipped_far_ahead == 1


def test_a_version_ahead_within_the_bound_is_taken_and_the_bound_grows_with_k(tmp_path):
    ex = _exchange(tmp_path, run_id=None, every=2000)  # max(10 K, 10,000) = 20,000
    ex.publish(0, 100, _state(0), {})
    _exchange(tmp_path, run_id=None).publish(1, 15_000, _state(1), {})
    assert ex.load(1, 15_000) is not None
    _exchange(tmp_path, run_id=None).publish(1, 30_000, _state(1), {})
    assert ex.load(1, 30_000) is not None  # 15,000 ahead of 15,000, the newest taken from replica 1
    _exchange(tmp_path, run_id=None).publish(1, 70_000, _state(1), {})
    assert ex.load(1, 70_000) is None


def test_with_a_key_a_signed_far_future_step_is_trusted(tmp_path):
    ex = _exchange(tmp_path, KEY)
    ex.publish(0, 10, _state(0), {})
    _exchange(tmp_path, KEY).publish(1, 1_000_000, _state(1), {})
    assert ex.load(1, 1_000_000) is not None


# -- codistill launch ------------------------------------------------------------------------
@pytest.mark.slow
def test_the_key_reaches_both_replicas_of_a_launched_run_and_no_file(tmp_path):
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg.update(steps=20, log_every=5)
    cfg["codistill"].update(sync=True, sync_timeout=120)  # every exchange loads the peer's version
    cfg["eval"].update(every=20, max_batches=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run, ex = tmp_path / "run", tmp_path / "ex"
    train = (f'exec "{sys.executable}" -m codistill train {tmp_path / "c.yaml"} --out {run} --no-progress '
             '--replica "$CODISTILL_REPLICA" --num-replicas "$CODISTILL_NUM_REPLICAS" '
             '--exchange "$CODISTILL_EXCHANGE"')  # one job per replica, as the launcher numbers them
    torchrun = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in torchrun}
    env.update(CODISTILL_EXCHANGE_KEY=KEY, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    job = subprocess.run([sys.executable, "-m", "codistill", "launch", "--replicas", "2", "--exchange",
                          str(ex), "--max-restarts", "0", "--", "sh", "-c", train],
                         env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    for r in (0, 1):
        rows = [json.loads(x) for x in (run / f"metrics-replica{r}.jsonl").read_text().splitlines()]
        versions = [x["teacher_versions"][str(1 - r)] for x in rows if x["kind"] == "train"]
        assert versions[-1] == 20, versions  # the peer's teacher, loaded (and verified) at every exchange
        manifest = json.loads(_manifest(ex, 20, r).read_text())
        assert manifest["kid"] == key_id(bytes.fromhex(KEY)) and manifest["run_id"] == "tiny-seed0"
    secret = [KEY.encode(), bytes.fromhex(KEY)]
    files = [p for p in [*run.rglob("*"), *ex.rglob("*")] if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and len(files) > 10
    assert not [p for p in files if any(s in p.read_bytes() for s in secret)]
    assert KEY not in job.stdout + job.stderr
