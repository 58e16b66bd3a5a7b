"""The exchange is untrusted input: oversized files, hostile headers and model specs are
rejected before they are read or built, warned about once, and training goes on."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from codistill.codistiller import Codistiller
from codistill.exchange import DirectoryExchange, state_nbytes
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
    assert cd.max_teacher_bytes == 4 * state_nbytes(peer.state_dict())


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
    read = cd.bytes_read
    cd.refresh(14)  # unchanged: not read again
    assert cd.bytes_read == read
