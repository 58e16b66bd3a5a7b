"""`codistill launch`: replicas of a user's script with their environment, prefixed output,
restarts, and a clean stop."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from codistill import launcher
from codistill.cli import main
from codistill.launcher import Launcher, replica_command

PRINT_ENV = """
import os, sys
keys = ["CODISTILL_REPLICA", "CODISTILL_NUM_REPLICAS", "CODISTILL_EXCHANGE", "CODISTILL_RESTART"]
print(" ".join(f"{k}={os.environ[k]}" for k in keys), "args=" + ",".join(sys.argv[1:]))
print("to stderr", file=sys.stderr)
"""

DIES_FIRST = """
import os, signal
if os.environ["CODISTILL_RESTART"] == "0":
    os.kill(os.getpid(), signal.SIGKILL)
print("attempt", os.environ["CODISTILL_RESTART"])
"""


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch):
    monkeypatch.setattr(launcher, "BACKOFF_FIRST", 0.01)


def _script(tmp_path, text: str) -> str:
    path = tmp_path / "train.py"
    path.write_text(text)
    return str(path)


def _launch(tmp_path, text: str, **kw) -> tuple[int, list[str], list[str]]:
    out, err = io.StringIO(), io.StringIO()
    code = Launcher([sys.executable, _script(tmp_path, text), "--lr", "3"], exchange=str(tmp_path / "ex"),
                    out=out, err=err, **kw).run()
    return code, out.getvalue().splitlines(), err.getvalue().splitlines()


def test_two_replicas_finish_with_their_environment_and_prefixed_output(tmp_path):
    code, out, err = _launch(tmp_path, PRINT_ENV, replicas=2)
    assert code == 0
    ex = tmp_path / "ex"
    assert sorted(out) == [f"[replica {r}] CODISTILL_REPLICA={r} CODISTILL_NUM_REPLICAS=2 "
                           f"CODISTILL_EXCHANGE={ex} CODISTILL_RESTART=0 args=--lr,3" for r in range(2)]
    assert sorted(err) == ["[replica 0] to stderr", "[replica 1] to stderr"]


def test_a_replica_that_dies_is_restarted(tmp_path, caplog):
    code, out, _ = _launch(tmp_path, DIES_FIRST, replicas=2)
    assert code == 0
    assert sorted(out) == ["[replica 0] attempt 1", "[replica 1] attempt 1"]
    assert "stopped with signal SIGKILL; restart 1 of 3" in caplog.text


def test_a_replica_that_keeps_failing_fails_the_launch(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(launcher, "QUICK_EXIT", 0.0)  # as if each ran a while: see test_launcher_args
    script = "import os; print('try', os.environ['CODISTILL_RESTART']); raise SystemExit(3)"
    code, out, _ = _launch(tmp_path, script, replicas=1, max_restarts=2)
    assert code == 1
    assert out == ["[replica 0] try 0", "[replica 0] try 1", "[replica 0] try 2"]
    assert "failed for good: exit code 3 after 2 restart(s)" in caplog.text


def test_workers_run_under_torchrun_with_a_port_per_replica():
    a, b = (replica_command(["python", "train.py", "--x"], 2, port) for port in (29500, 29501))
    assert a[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in a
    assert "--master-port=29500" in a and "--master-port=29501" in b
    assert a[-4:] == ["--no-python", "python", "train.py", "--x"]
    assert replica_command(["python", "train.py"], 1, 0) == ["python", "train.py"]


def test_cli_launch_parses_the_command_after_the_separator(tmp_path, capfd):
    script = _script(tmp_path, PRINT_ENV)
    assert main(["launch", "--replicas", "1", "--exchange", str(tmp_path / "ex"), "--",
                 sys.executable, script, "--flag"]) == 0
    assert "[replica 0] CODISTILL_REPLICA=0 " in capfd.readouterr().out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_sigterm_stops_every_replica_and_its_children(tmp_path):
    # Each replica starts a grandchild in its process group, writes both pids and waits.
    script = _script(tmp_path, f"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(os.path.join({str(tmp_path)!r}, "pids-" + os.environ["CODISTILL_REPLICA"]), "w") as f:
    f.write(f"{{os.getpid()}} {{child.pid}}")
time.sleep(60)
""")
    launcher = subprocess.Popen([sys.executable, "-m", "codistill", "launch", "--replicas", "2",
                                 "--exchange", str(tmp_path / "ex"), "--grace", "5", "--", sys.executable,
                                 script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    files = [tmp_path / "pids-0", tmp_path / "pids-1"]
    deadline = time.monotonic() + 30
    while not all(f.exists() and f.read_text() for f in files):
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()
        time.sleep(0.05)
    pids = [int(p) for f in files for p in f.read_text().split()]
    assert all(_alive(p) for p in pids)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=20) == 128 + signal.SIGTERM
    assert "stopping 2 replica(s) (SIGTERM)" in launcher.stderr.read()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]
