"""`codistill launch` in a script's first hour: ``{replica}`` in the command's arguments, a
warning for an output path every replica shares, the launcher's own interpreter for a bare
``python``, no retries of a crash at start-up, and restarts that back off without holding up
the other replicas."""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
import time

import pytest

from codistill import launcher
from codistill.launcher import Launcher, backoff, own_python, replica_args, shared_outputs


def _launch(command: list[str], tmp_path, **kw) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = Launcher(command, exchange=str(tmp_path / "ex"), out=out, err=io.StringIO(), **kw).run()
    return code, out.getvalue().splitlines()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- {replica}, {num_replicas} and the shared-output warning ----------------------------------
def test_replica_and_num_replicas_are_replaced_in_every_argument():
    command = ["python", "t.py", "--out=runs/r{replica}", "{replica}", "n{num_replicas}-{replica}"]
    assert replica_args(command, 1, 3) == ["python", "t.py", "--out=runs/r1", "1", "n3-1"]
    assert replica_args(["sh", "-c", "echo {x} ${HOME}"], 0, 2) == ["sh", "-c", "echo {x} ${HOME}"]


def test_each_replica_writes_its_own_file_through_replica_in_an_argument(tmp_path, caplog):
    script = tmp_path / "train.py"
    script.write_text("""
import os, sys
out = sys.argv[1].split("=", 1)[1]
with open(out, "x") as f:  # "x": fails if another replica wrote it first
    f.write(os.environ["CODISTILL_REPLICA"] + " of " + sys.argv[2])
""")
    command = [sys.executable, str(script), f"--out={tmp_path}/r{{replica}}.txt", "{num_replicas}"]
    code, _ = _launch(command, tmp_path, replicas=3, max_restarts=0)
    assert code == 0
    assert [(tmp_path / f"r{r}.txt").read_text() for r in range(3)] == ["0 of 3", "1 of 3", "2 of 3"]
    assert not _warnings(caplog)


def test_an_output_path_every_replica_shares_is_warned_about_once_by_name(tmp_path, caplog):
    script = tmp_path / "train.py"
    script.write_text("")
    command = [sys.executable, str(script), "--save", str(tmp_path / "model.pt"), "--out",
               str(tmp_path / "runs-{replica}"), "--lr", "0.1"]
    Launcher(command, replicas=2, exchange=str(tmp_path / "ex"))
    [warning] = _warnings(caplog)
    assert f"'--save {tmp_path / 'model.pt'}' is the same for every replica" in warning
    assert "{replica}" in warning
    caplog.clear()
    Launcher(command, replicas=1, exchange=str(tmp_path / "ex"))  # one replica shares with nobody
    assert not _warnings(caplog)


@pytest.mark.parametrize("args, shared", [
    (["--save", "model.pt"], ["--save model.pt"]),
    (["--save", "model-{replica}.pt", "--out=runs/r{replica}"], []),
    (["--out=runs/n{num_replicas}"], ["--out=runs/n{num_replicas}"]),  # the same for every replica
    (["--output_dir", "out", "--logging_dir=runs/logs", "--overwrite_output_dir"],
     ["--output_dir out", "--logging_dir=runs/logs"]),
    (["--ckpt", "last", "--checkpoint_dir", "ck", "-o", "out.bin"], ["--ckpt last", "--checkpoint_dir ck",
                                                                     "-o out.bin"]),
    (["--output_dir", "existing_dir"], ["--output_dir existing_dir"]),  # an earlier run's: still shared
    (["trainer.default_root_dir=outputs", "model=resnet", "lr=0.1"], ["trainer.default_root_dir=outputs"]),
    (["results.json", "outputs/run1", "logs"], ["results.json", "outputs/run1", "logs"]),
    # options named for something written, whose value is not a path
    (["--save_steps", "500", "--save_strategy", "steps", "--log_level", "info", "--log_every", "10",
      "--save_total_limit", "2", "--dropout", "0.1", "--layout", "nchw", "--output_hidden", "true"], []),
    # inputs: existing files, names of inputs (or a shared cache), a hub id, a URL, text
    (["data.txt", "--config", "config.yaml", "--cache_dir", "cache", "--data_dir", "d",
      "--resume_from_checkpoint", "ck/last.pt", "--model_name_or_path", "facebook/opt-125m",
      "--url", "http://host/out.txt", "--prompt", "save it to out.txt"], []),
])
def test_the_shared_output_heuristic(args, shared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    (tmp_path / "data.txt").write_text("")
    (tmp_path / "config.yaml").write_text("")
    (tmp_path / "existing_dir").mkdir()
    assert shared_outputs(["python", "train.py", *args]) == shared


def test_the_heuristic_never_names_the_program_or_the_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file exists: a typo'd script is not an output
    assert shared_outputs(["python", "-u", "-X", "dev", "new_script.py"]) == []
    assert shared_outputs([sys.executable, "-m", "torch.distributed.run", "out.txt"]) == ["out.txt"]
    assert shared_outputs(["python3", "-c", "open('out.txt', 'w')", "save.pt"]) == ["save.pt"]
    assert shared_outputs(["./train.sh", "out.txt"]) == ["out.txt"]


# -- the launcher's own interpreter ------------------------------------------------------------
def test_a_bare_python_is_this_interpreter():
    minor = sys.version_info.minor
    for word in ("python", "python3", f"python3.{minor}"):
        assert own_python([word, "t.py"]) == [sys.executable, "t.py"]
    for word in (f"python3.{minor + 1}", "python2", "/usr/bin/python3", "pythonx", "sh"):
        assert own_python([word, "t.py"]) == [word, "t.py"]


@pytest.mark.parametrize("word, fake", [("python", True), ("python3", False),
                                        (f"python3.{sys.version_info.minor}", True)])
def test_a_launched_bare_python_runs_the_launchers_interpreter_whatever_is_on_path(
        word, fake, tmp_path, monkeypatch, caplog):
    bin_dir = tmp_path / "bin"  # the whole PATH: a python that is not ours, or none at all
    bin_dir.mkdir()
    if fake:
        (bin_dir / word).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / word).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    caplog.set_level(logging.INFO, logger="codistill.launcher")
    monkeypatch.setenv("OUT", str(tmp_path / "exe-"))
    write = ("import os, sys; "
             "open(os.environ['OUT'] + os.environ['CODISTILL_REPLICA'], 'w').write(sys.executable)")
    assert _launch([word, "-c", write], tmp_path, replicas=2, max_restarts=0)[0] == 0
    for r in (0, 1):
        assert os.path.samefile((tmp_path / f"exe-{r}").read_text(), sys.executable)
    assert f"running '{word}' as {sys.executable}" in caplog.text


# -- restarts ----------------------------------------------------------------------------------
def test_backoff_doubles_up_to_its_cap(monkeypatch):
    monkeypatch.setattr(launcher, "BACKOFF_FIRST", 1.0)
    monkeypatch.setattr(launcher, "BACKOFF_MAX", 5.0)
    assert [backoff(k) for k in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_crash_at_start_up_is_started_twice_not_retried_to_the_limit(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(launcher, "BACKOFF_FIRST", 0.01)
    crash = "import os; print('start', os.environ['CODISTILL_RESTART']); raise SystemExit(3)"
    code, out = _launch(["python", "-c", crash], tmp_path, replicas=1, max_restarts=5)
    assert code == 1
    assert out == ["[replica 0] start 0", "[replica 0] start 1"]
    assert "replica 0 failed for good: exit code 3 twice in a row, each time within 10 s" in caplog.text
    assert "is not retried" in caplog.text


def test_quick_crashes_with_different_exit_codes_are_retried(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(launcher, "BACKOFF_FIRST", 0.01)
    crash = "import os; raise SystemExit(3 + int(os.environ['CODISTILL_RESTART']))"
    code, _ = _launch(["python", "-c", crash], tmp_path, replicas=1, max_restarts=2)
    assert code == 1
    assert "failed for good: exit code 5 after 2 restart(s)" in caplog.text


def test_restarts_of_a_replica_that_ran_a_while_back_off(tmp_path, caplog, monkeypatch):
    # It runs 0.3 s (> QUICK_EXIT) and fails with the same code each time: restarted, not given up.
    monkeypatch.setattr(launcher, "QUICK_EXIT", 0.2)
    monkeypatch.setattr(launcher, "BACKOFF_FIRST", 0.5)
    monkeypatch.setattr(launcher, "BACKOFF_MAX", 10.0)
    log_file = tmp_path / "times"
    script = tmp_path / "train.py"
    script.write_text(f"""
import time
with open({str(log_file)!r}, "a") as f:
    f.write(f"start {{time.time()}}\\n")
time.sleep(0.3)
with open({str(log_file)!r}, "a") as f:
    f.write(f"end {{time.time()}}\\n")
raise SystemExit(1)
""")
    code, _ = _launch(["python", str(script)], tmp_path, replicas=1, max_restarts=2)
    assert code == 1
    assert "failed for good: exit code 1 after 2 restart(s)" in caplog.text
    events = [line.split() for line in log_file.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end"] * 3
    ends, starts = [float(e[1]) for e in events[1::2]], [float(e[1]) for e in events[0::2]]
    # The child writes "end" before it exits; the launcher sees the exit after that, waits out
    # the backoff from then, and only then starts the child that writes the next "start". So
    # each gap is at least the backoff, whatever the machine's load (0.01 s: the two processes'
    # wall clocks, one host, no step in 2 s). No upper bound: a slow start only adds.
    gaps = [starts[k + 1] - ends[k] for k in range(2)]
    assert gaps[0] >= 0.5 - 0.01 and gaps[1] >= 1.0 - 0.01, gaps
    assert "restart 1 of 2 in 0.5 s" in caplog.text and "restart 2 of 2 in 1 s" in caplog.text


def test_other_replicas_are_supervised_and_ctrl_c_heard_while_one_waits_to_restart(
        tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(launcher, "BACKOFF_FIRST", 60.0)
    caplog.set_level(logging.INFO, logger="codistill.launcher")
    script = tmp_path / "train.py"
    script.write_text("""
import os, time
print("start")
if os.environ["CODISTILL_REPLICA"] == "0":
    raise SystemExit(4)
time.sleep(0.5)
""")

    def ctrl_c_once_replica_1_finished() -> None:
        deadline = time.monotonic() + 30
        while not any("replica 1 finished" in r.getMessage() for r in list(caplog.records)):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's handler: Ctrl-C

    threading.Thread(target=ctrl_c_once_replica_1_finished, daemon=True).start()
    began = time.monotonic()
    code, out = _launch(["python", str(script)], tmp_path, replicas=2)
    # Replica 1 ended and was seen ending, and Ctrl-C was answered, inside replica 0's 60 s
    # backoff: a launcher that slept through the backoff could not have returned before it.
    assert time.monotonic() - began < 60
    assert code == 128 + signal.SIGINT
    assert "replica 0 stopped with exit code 4; restart 1 of 3 in 60 s" in caplog.text
    assert "replica 1 finished" in caplog.text
    assert sorted(out) == ["[replica 0] start", "[replica 1] start"]  # replica 0 never restarted
