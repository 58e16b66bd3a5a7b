"""``--resume`` guards and Ctrl-C, in the one-process engine and under torchrun (2 gloo ranks).

* a finished run: one log line, exit code 0, not a byte of the run directory changed;
* a changed config: refused with one line naming each field (old → new), exit code 2, nothing
  written; ``--allow-changes`` keeps ``config.yaml``, records ``config.resume-STEP.yaml``
  and trains with the new values; placement fields (threads, the exchange location, ...) may
  change freely;
* Ctrl-C: one line naming the run directory, the newest checkpoint and the exact ``--resume``
  command, exit code 130, and a checkpoint being written is completed first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from codistill.checkpoint import list_checkpoints, read_state, valid_steps
from codistill.cli import main
from codistill.config import from_dict, load_config
from codistill.engine import run
from codistill.runlog import read_metrics

pytestmark = pytest.mark.slow  # whole runs through the CLI, some under torchrun: not in the fast tier

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")


def _values(tiny_config_factory, **top):
    values = tiny_config_factory(steps=10, checkpoint={"every": 5}, **top)
    values["eval"] = {"every": 5, "batch_size": 16, "max_batches": 2}
    return values


def _snapshot(run_dir: Path) -> dict[str, str | None]:
    """Every path under the run directory with its file's SHA-256 (None for a directory)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(run_dir.rglob("*"))}


def _errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("codistill: error:")]


@pytest.fixture
def config_file(tiny_config_factory, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_values(tiny_config_factory)))
    return path


# -- the one-process engine ----------------------------------------------------------------------
def _train(config_file, out, *args):
    return main(["train", str(config_file), "--out", str(out), "--no-progress", *args])


def test_resume_of_a_finished_run_says_so_and_changes_nothing(config_file, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert _train(config_file, out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="codistill"):
        assert _train(config_file, out, "--resume") == 0
        # A changed field does not matter either: nothing is left to train.
        assert _train(config_file, out, "--resume", "--set", "optimizer.lr=0.01") == 0
    said = [r.getMessage() for r in caplog.records if "is finished" in r.getMessage()]
    assert len(said) == 2 and "step 10 of 10" in said[0] and str(out) in said[0], said
    printed = capsys.readouterr()
    assert printed.out == "" and "Traceback" not in printed.err
    assert _snapshot(out) == before  # before: summary.json rewritten with "final": null
    assert json.loads((out / "summary.json").read_text())["final"]["models"]


def test_a_crash_after_the_final_checkpoint_is_completed_not_called_finished(config_file, tmp_path, capsys):
    """The final checkpoint is written before the final weights and summary: a resume that
    finds it without them writes them (the final evaluation again, its rows not twice)."""
    out = tmp_path / "run"
    assert _train(config_file, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    weights = {r: (out / f"replica-{r}" / "model.safetensors").read_bytes() for r in (0, 1)}
    metrics = (out / "metrics.jsonl").read_bytes()
    (out / "summary.json").unlink()
    (out / "replica-1" / "model.safetensors").unlink()
    capsys.readouterr()
    assert _train(config_file, out, "--resume") == 0
    assert "steps 10..10; validation loss per replica" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    assert again["final"] == summary["final"] and (again["start"], again["end"]) == (10, 10)
    assert {r: (out / f"replica-{r}" / "model.safetensors").read_bytes() for r in (0, 1)} == weights
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_the_engine_api_returns_the_saved_summary_of_a_finished_run(tiny_config_factory, tmp_path):
    cfg = from_dict(_values(tiny_config_factory, replicas=1))
    done = run(cfg, str(tmp_path / "run"), progress=False)
    again = run(cfg, str(tmp_path / "run"), progress=False, resume=True)
    assert again["finished"] and again["final"] == json.loads(json.dumps(done["final"]))


def test_resume_with_a_changed_config_is_refused_naming_each_field(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(config_file, out, "--stop-at", "5") == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert _train(config_file, out, "--resume", "--set", "optimizer.lr=0.01", "--set", "codistill.alpha=0.5",
                  "--set", "threads=2") == 2
    err = capsys.readouterr().err
    (line,) = _errors(err)
    assert ("the config differs from the one its checkpoint at step 5 was written with: "
            "codistill.alpha 1.0 → 0.5, optimizer.lr 0.003 → 0.01;") in line, line
    assert "--allow-changes" in line and "threads" not in line and "Traceback" not in err
    assert _snapshot(out) == before  # before: accepted silently, config.yaml rewritten
    # Fields the checkpoint's data position or optimizer state depend on cannot change even when
    # allowed (before: a changed optimizer was a traceback from Distributed Checkpoint's loader).
    for field, change in (("batch_size=4", "batch_size 8 → 4"), ("optimizer.name=sgd", "'adam' → 'sgd'")):
        assert _train(config_file, out, "--resume", "--allow-changes", "--set", field) == 2
        err = capsys.readouterr().err
        (line,) = _errors(err)
        assert change in line and "cannot change on resume" in line and "Traceback" not in err, err
        assert _snapshot(out) == before


def test_allow_changes_records_both_configs_and_trains_with_the_new_one(config_file, tmp_path, caplog):
    out = tmp_path / "run"
    assert _train(config_file, out, "--stop-at", "5") == 0
    original = (out / "config.yaml").read_bytes()
    new_lr = ["--set", "optimizer.lr=0.01"]
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert _train(config_file, out, "--resume", "--allow-changes", *new_lr, "--stop-at", "8") == 0
    assert (out / "config.yaml").read_bytes() == original
    record = out / "config.resume-5.yaml"
    assert record.read_text().startswith("# resumed at step 5 with: optimizer.lr 0.003 → 0.01\n")
    assert load_config(str(record)).optimizer.lr == 0.01
    assert load_config(str(out / "config.yaml")).optimizer.lr == 0.003
    logged = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
    assert len(logged) == 1 and "optimizer.lr 0.003 → 0.01" in logged[0] and str(record) in logged[0]
    # The checkpoint at 8 was written with lr 0.01: going on with it needs nothing more, going
    # back to 0.003 is a change again.
    assert _train(config_file, out, "--resume") == 2
    assert _train(config_file, out, "--resume", *new_lr) == 0
    assert not (out / "config.resume-8.yaml").exists()
    # The checkpoint's optimizer carried lr 0.003: the new value is the one trained with.
    lrs = {r["step"]: r["lr"] for r in read_metrics(str(out)) if r["kind"] == "train" and r["replica"] == 0}
    assert lrs == {5: 0.003, 8: 0.01, 10: 0.01}


def test_a_checkpoint_without_a_saved_config_is_compared_with_config_yaml(config_file, tmp_path, capsys):
    """Checkpoints written before configs were saved in them: the run's config.yaml is the
    reference."""
    out = tmp_path / "run"
    assert _train(config_file, out, "--stop-at", "5") == 0
    for r in (0, 1):  # as an older codistill wrote it: no config in trainer.pt
        folder = out / "checkpoints" / f"replica-{r}" / f"{5:010d}"
        trainer = torch.load(folder / "trainer.pt", weights_only=True)
        del trainer["config"]
        torch.save(trainer, folder / "trainer.pt")
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["sha256"]["trainer.pt"] = hashlib.sha256((folder / "trainer.pt").read_bytes()).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    assert _train(config_file, out, "--resume", "--set", "optimizer.lr=0.01") == 2
    assert "optimizer.lr 0.003 → 0.01" in _errors(capsys.readouterr().err)[0]
    assert _train(config_file, out, "--resume") == 0


def test_placement_fields_may_change_without_allow_changes(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(config_file, out, "--stop-at", "5") == 0
    assert _train(config_file, out, "--resume", "--set", "threads=2", "--set", "checkpoint.keep=3",
                  "--set", "diverge_factor=0") == 0
    assert "steps 5..10" in capsys.readouterr().out
    assert "threads 1 → 2" in (out / "config.resume-5.yaml").read_text().splitlines()[0]


def test_a_finished_run_trains_on_with_more_steps_only_when_allowed(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(config_file, out) == 0
    before = _snapshot(out)
    assert _train(config_file, out, "--resume", "--set", "steps=15") == 2
    assert "steps 10 → 15" in _errors(capsys.readouterr().err)[0]
    assert _snapshot(out) == before
    assert _train(config_file, out, "--resume", "--set", "steps=15", "--allow-changes") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["start"], summary["end"], summary["steps"]) == (10, 15, 15) and summary["final"]
    # Fewer steps than the newest checkpoint: nothing to train, said in one line.
    assert _train(config_file, out, "--resume", "--set", "steps=12", "--allow-changes") == 2
    assert "checkpoint at step 15 is not before steps=12" in _errors(capsys.readouterr().err)[0]


# -- Ctrl-C ---------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([SRC, env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return env


def _interrupt_once(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Start ``cmd``, send SIGINT to its process group (as a terminal's Ctrl-C does) once both
    replicas have a checkpoint in ``cwd/run``, and return what it did."""
    root = str(cwd / "run" / "checkpoints")
    # SIGINT's default action in the child, as under a terminal: a suite started in the
    # background (`make test &`, nohup) passes SIGINT on as ignored, and Python keeps it so.
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not all(list_checkpoints(root, r) for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_is_one_line_naming_the_resume_command_which_completes_the_run(tiny_config_factory, tmp_path):
    # 3000 steps: the interrupt must come before the end on any machine; the resumed run and
    # the uninterrupted one both stop at step STOP (same schedule, so the same weights).
    values = tiny_config_factory(steps=3000, checkpoint={"every": 10})
    values["eval"]["max_batches"] = 2
    stop = 60
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    cmd = [sys.executable, "-m", "codistill", "train", "c.yaml", "--out", "run", "--no-progress"]
    done = _interrupt_once(cmd, tmp_path)
    lines = [ln for ln in done.stderr.splitlines() if " INFO " not in ln and " WARNING " not in ln]
    assert done.returncode == 130 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = lines
    newest = max(set(valid_steps(str(tmp_path / "run" / "checkpoints"), 0))
                 & set(valid_steps(str(tmp_path / "run" / "checkpoints"), 1)))
    assert line.startswith(f"codistill: interrupted: run directory run, newest checkpoint step {newest}; "
                           "continue with: codistill train c.yaml --out run --no-progress --resume"), line
    assert not list((tmp_path / "run" / "checkpoints").glob("*/.staging-*")), "a half-written checkpoint"
    rows = read_metrics(str(tmp_path / "run"))
    assert rows and max(r["step"] for r in rows) >= newest  # every row up to the interrupt is on disk
    # The printed command continues the run; it ends as an uninterrupted run does.
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[0] == "codistill"
    assert newest < stop
    resumed = subprocess.run([sys.executable, "-m", *command, "--stop-at", str(stop)], cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"steps {newest}..{stop}" in resumed.stdout, resumed.stdout
    whole = tmp_path / "whole"
    run(from_dict(values), str(whole), progress=False, stop_at=stop)
    for r in (0, 1):
        a, b = (read_state(str(d / "checkpoints" / f"replica-{r}" / f"{stop:010d}"))["model"]
                for d in (tmp_path / "run", whole))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), \
            f"replica {r}: resumed weights differ"


def test_ctrl_c_while_a_checkpoint_is_written_completes_it_first(tiny_config_factory, tmp_path, capsys,
                                                                 monkeypatch, request):
    """SIGINT arrives while replica 0's checkpoint at step 10 is being written: the checkpoint
    is completed, then the run stops with the one line; a second SIGINT acts at once and
    leaves only a staging folder, which is never taken for a checkpoint."""
    from codistill import checkpoint

    # Python's own handler, as in a fresh `codistill` process (a library imported by an earlier
    # test may have replaced it in this one).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    values = _values(tiny_config_factory)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    write = checkpoint.atomic_write
    signals = {"count": 1}

    def interrupted_write(path, data):
        if f"{10:010d}" in path and path.endswith("trainer.pt"):
            for _ in range(signals["count"]):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs between bytecodes
        write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write", interrupted_write)
    out = tmp_path / "run"
    assert _train(tmp_path / "c.yaml", out) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "newest checkpoint step 5;" in _interrupted(err), err
    root = str(out / "checkpoints")
    assert valid_steps(root, 0) == [5, 10] and valid_steps(root, 1) == [5]  # replica 0's save completed

    signals["count"] = 2  # Ctrl-C twice: the second stops the save half-way
    out2 = tmp_path / "run2"
    assert _train(tmp_path / "c.yaml", out2) == 130
    root = str(out2 / "checkpoints")
    assert list((out2 / "checkpoints" / "replica-0").glob(".staging-*"))
    assert valid_steps(root, 0) == [5] and checkpoint.list_checkpoints(root, 0) == [5]
    monkeypatch.setattr(checkpoint, "atomic_write", write)
    assert _train(tmp_path / "c.yaml", out2, "--resume") == 0
    assert json.loads((out2 / "summary.json").read_text())["start"] == 5


def test_sigterm_ends_the_run_after_its_step_with_a_checkpoint_and_the_resume_line(
        tiny_config_factory, tmp_path, capsys, monkeypatch, request):
    """SIGTERM (a scheduler's time limit) at step 7, between checkpoints (every 5): the run
    ends after step 7 with a checkpoint of both replicas and the rows up to it, says where to
    resume in one line and exits 143; resumed to step 12 it has the weights of a run never
    stopped. Without the handler the last checkpoint would be step 5."""
    from codistill.loop import Loop

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a fresh process
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    values = {**_values(tiny_config_factory), "steps": 20}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    publish_and_refresh = Loop.publish_and_refresh

    def killed_at_7(self, done):
        if done == 7 and not self.stop_requested:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs between bytecodes
            assert self.stop_requested
        return publish_and_refresh(self, done)

    monkeypatch.setattr(Loop, "publish_and_refresh", killed_at_7)
    out = tmp_path / "run"
    assert _train(tmp_path / "c.yaml", out) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("codistill: stopped by SIGTERM")]
    assert line.startswith("codistill: stopped by SIGTERM after step 7: run directory "), line
    assert "newest checkpoint step 7; continue with: codistill train " in line and line.endswith("--resume")
    root = str(out / "checkpoints")
    assert valid_steps(root, 0) == valid_steps(root, 1) == [5, 7]
    rows = read_metrics(str(out))
    assert max(r["step"] for r in rows if r["kind"] == "train") == 7
    monkeypatch.setattr(Loop, "publish_and_refresh", publish_and_refresh)
    assert _train(tmp_path / "c.yaml", out, "--resume", "--stop-at", "12") == 0
    whole = tmp_path / "whole"
    run(from_dict(values), str(whole), progress=False, stop_at=12)
    for r in (0, 1):
        a, b = (read_state(str(d / "checkpoints" / f"replica-{r}" / f"{12:010d}"))["model"]
                for d in (out, whole))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), f"replica {r}"


def _interrupted(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("codistill: interrupted")]
    assert len(lines) == 1, err
    return lines[0]


# -- under torchrun: one world of 2 replicas x 1 worker, gloo, a directory exchange ---------------
def _torchrun(*args: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={port}", "-m", "codistill", "train", "c.yaml", "--out", "run", "--no-progress",
            "--exchange", "run/exchange", *args]


def _launch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun(*args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture
def torchrun_dir(tiny_config_factory, tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_values(tiny_config_factory)))
    return tmp_path


def test_torchrun_resume_of_a_finished_run_changes_nothing(torchrun_dir):
    assert _launch(torchrun_dir).returncode == 0
    before = _snapshot(torchrun_dir / "run")
    assert ".elastic" in before  # torchrun's marker: a first attempt used to delete it
    again = _launch(torchrun_dir, "--resume")
    assert again.returncode == 0, again.stderr
    said = [ln for ln in again.stderr.splitlines() if "is finished" in ln]
    assert len(said) == 1 and "step 10 of 10" in said[0], again.stderr  # rank 0 only
    assert "steps" not in again.stdout and _snapshot(torchrun_dir / "run") == before


def test_torchrun_resume_with_a_changed_config_is_refused_unless_allowed(torchrun_dir):
    assert _launch(torchrun_dir, "--stop-at", "5").returncode == 0
    run_dir = torchrun_dir / "run"
    before, before_config = _snapshot(run_dir), (run_dir / "config.yaml").read_bytes()
    refused = _launch(torchrun_dir, "--resume", "--set", "optimizer.lr=0.01")
    assert refused.returncode != 0 and "exitcode  : 2" in refused.stderr  # torchrun's own report
    lines = _errors(refused.stderr)
    assert lines and all("checkpoint at step 5 was written with: optimizer.lr 0.003 → 0.01;" in ln
                         for ln in lines), refused.stderr
    assert _snapshot(run_dir) == before
    allowed = _launch(torchrun_dir, "--resume", "--set", "optimizer.lr=0.01", "--allow-changes")
    assert allowed.returncode == 0, allowed.stderr
    assert (run_dir / "config.yaml").read_bytes() == before_config
    assert load_config(str(run_dir / "config.yaml")).optimizer.lr == 0.003
    assert load_config(str(run_dir / "config.resume-5.yaml")).optimizer.lr == 0.01
    for r in (0, 1):
        rows = read_metrics(str(run_dir / f"metrics-replica{r}.jsonl"))
        assert {x["step"]: x["lr"] for x in rows if x["kind"] == "train"} == {5: 0.003, 10: 0.01}


def test_torchrun_ctrl_c_is_one_line_and_resume_completes(tiny_config_factory, tmp_path):
    values = tiny_config_factory(steps=400, checkpoint={"every": 10})
    values["eval"] = {"every": 200, "batch_size": 16, "max_batches": 2}
    values["codistill"]["sync"] = True  # lock-step: neither replica runs far ahead of the other
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    done = _interrupt_once(_torchrun(), tmp_path)
    assert done.returncode != 0
    line = _interrupted(done.stderr)  # once: rank 0 says it for the world
    assert "run directory run, newest checkpoint step" in line and line.endswith(
        "--resume under the same torchrun launch"), line
    assert not list((tmp_path / "run" / "checkpoints").glob("*/.staging-*"))
    resumed = _launch(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for r in (0, 1):
        summary = json.loads((tmp_path / "run" / f"summary-replica{r}.json").read_text())
        assert summary["end"] == 400 and summary["start"] >= 10 and summary["final"]


def test_one_job_per_replica_guards_its_own_replica(tiny_config_factory, tmp_path, caplog):
    """``--replica R`` jobs (here in this process, W=1): the same checks, named per replica."""
    from codistill.config import ConfigError
    from codistill.launch import run_distributed

    values = _values(tiny_config_factory)
    values["codistill"]["exchange"] = str(tmp_path / "run" / "exchange")
    out = tmp_path / "run"
    assert run_distributed(from_dict(values), str(out), replica=1, progress=False)["end"] == 10
    before = _snapshot(out)
    with caplog.at_level(logging.INFO, logger="codistill"):
        again = run_distributed(from_dict(values), str(out), replica=1, resume=True, progress=False)
    assert again["finished"] and again["final"]["models"] and _snapshot(out) == before
    assert any("run tiny (replica 1) is finished" in r.getMessage() for r in caplog.records)
    values["optimizer"]["lr"] = 0.01
    values["steps"] = 15
    changed = r"--resume \(replica 1\): .*optimizer.lr 0.003 → 0.01, steps 10 → 15"
    with pytest.raises(ConfigError, match=changed):
        run_distributed(from_dict(values), str(out), replica=1, resume=True, progress=False)
    assert _snapshot(out) == before


# -- the fingerprint and `workers` ----------------------------------------------------------------
def test_the_engine_checkpoint_fingerprint_holds_the_effective_batch(tiny_config_factory, tmp_path):
    """A checkpoint the engine wrote with W×b examples per step is refused with another W,
    even when its saved config is not there to compare (the fingerprint's own check)."""
    from codistill.config import ConfigError
    from codistill.run import Placement, make_checkpointer
    from codistill.tasks import build_task

    values = _values(tiny_config_factory, replicas=1)
    cfg = from_dict(values)
    run(cfg, str(tmp_path / "run"), progress=False, stop_at=5)
    other = from_dict({**values, "workers": 2})
    task = build_task(other)

    class Rep:  # what make_checkpointer reads of a replica
        index, spec = 0, task.model_spec(other.replica_model(0))

    place = Placement([0], other.workers * other.batch_size, "cpu")
    ck = make_checkpointer(other, str(tmp_path / "run"), Rep(), place)  # type: ignore[arg-type]
    assert ck.fingerprint["effective_batch"] == 2 * cfg.batch_size
    with pytest.raises(ConfigError, match="effective_batch"):
        ck.load(5)
    place = Placement([0], cfg.batch_size, "cpu")
    same = make_checkpointer(cfg, str(tmp_path / "run"), Rep(), place)  # type: ignore[arg-type]
    assert same.load(5).shared["step"] == 5


def test_workers_under_torchrun_is_1_or_the_ranks_per_replica(tiny_config_factory, tmp_path):
    """Under torchrun W is the world's ranks per replica; a config's ``workers`` other than 1
    or that W is one clear error (here a world of one rank, a job for replica 0)."""
    from codistill.config import ConfigError
    from codistill.launch import run_distributed

    values = _values(tiny_config_factory, replicas=1, workers=2)
    with pytest.raises(ConfigError, match=r"workers=2, but this torchrun job has 1 rank\(s\) per replica"):
        run_distributed(from_dict(values), str(tmp_path / "run"), replica=0, progress=False)
    assert not (tmp_path / "run").exists()
