"""`codistill launch --slurm`: the job array's batch script, and real runs on a one-host Slurm.

The script is unit-tested as text and, with stand-ins for ``scontrol`` and the training
command, as a running bash script (fast tier). The slow tests submit it to the cluster of
tests/slurm_cluster.py (munged, slurmctld and slurmd started by the session fixture):
two replicas of a tiny ``codistill train`` run, one crashed and one requeued from outside
(both come back and resume from their checkpoints), and a user's script as a torchrun
group of two workers in each array task.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CONFIG
from slurm_cluster import SlurmCluster, free_port_block, slurm_cluster  # noqa: F401 (a fixture)
from test_distributed import _assert_one_row_per_step, _by_step, _checkpoints, _env, _exchange_versions, _rows

from codistill.cli import main
from codistill.slurm import SlurmSpec, batch_script, is_codistill_train, make_spec, shell_command

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

TRAIN = ["python", "-m", "codistill", "train", "cfg.yaml", "--replica", "{replica}",
         "--num-replicas", "{num_replicas}", "--exchange", "/shared/ex", "--out", "/shared/run"]


def _spec(command: list[str], **kw) -> SlurmSpec:
    return SlurmSpec(tuple(command), kw.pop("replicas", 2), "/shared/ex", "/shared/run/slurm", **kw)


# -- the script, as text ------------------------------------------------------------------------
def test_one_array_task_per_replica_requeued_and_logged_per_task():
    script = batch_script(_spec([PY, "train.py"], replicas=3, sbatch_args=("--partition=gpu",)))
    header = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert header == ["#SBATCH --job-name=codistill", "#SBATCH --array=0-2", "#SBATCH --nodes=1",
                      "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                      "#SBATCH --output=/shared/run/slurm/replica-%a.log", "#SBATCH --partition=gpu"]
    assert ("export CODISTILL_REPLICA=$SLURM_ARRAY_TASK_ID CODISTILL_NUM_REPLICAS=3 "
            "CODISTILL_EXCHANGE=/shared/ex") in script
    assert "export CODISTILL_RESTART=${SLURM_RESTART_COUNT:-0}" in script
    assert f"\n{PY} train.py\n" in script  # W = 1: the command itself, no srun or torchrun
    assert "srun" not in script and "--resume" not in script  # not codistill train: CODISTILL_RESTART
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_replica_in_an_argument_becomes_the_array_task_quoted_for_the_shell():
    args = ["--out=runs/r{replica}", "a b{replica}", "{num_replicas}", "$HOME"]
    line = shell_command(["printf", "%s|", *args], 4)
    assert line == "printf '%s|' --out=runs/r\"$CODISTILL_REPLICA\" 'a b'\"$CODISTILL_REPLICA\" 4 '$HOME'"
    out = subprocess.run(["bash", "-c", f"CODISTILL_REPLICA=2; {line}"], capture_output=True, text=True,
                         check=True).stdout
    assert out == "--out=runs/r2|a b2|4|$HOME|"


@pytest.mark.parametrize("command, train", [
    (["codistill", "train", "c.yaml"], True),
    (["/venv/bin/codistill", "-v", "train", "c.yaml"], True),
    ([PY, "-m", "codistill", "train", "c.yaml"], True),
    (["codistill", "report", "runs/x"], False),
    ([PY, "train.py", "train"], False),
    ([PY, "-m", "mypkg", "train"], False),
])
def test_which_commands_are_codistill_train(command, train):
    assert is_codistill_train(command) is train


def test_codistill_train_gets_resume_when_requeued_and_needs_its_replica():
    script = batch_script(_spec([PY, *TRAIN[1:]]))
    assert 'if [ "$CODISTILL_RESTART" -gt 0 ]; then resume=(--resume); fi' in script
    assert '--replica "$CODISTILL_REPLICA" --num-replicas 2' in script
    assert script.count('"${resume[@]}"') == 1
    with pytest.raises(ValueError, match="--replica {replica}"):
        make_spec(["codistill", "train", "cfg.yaml", "--out", "run"], 2, "ex", "run")


def test_workers_over_nodes_are_one_torchrun_agent_per_node():
    script = batch_script(_spec([PY, *TRAIN[1:]], workers=8, nodes=2, master_port=29600, max_restarts=1))
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    run = script[script.index("srun "):script.index("code=$?")]
    assert f"srun --kill-on-bad-exit=1 {PY} -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" " \
           "--nproc-per-node=4" in run
    assert '--rdzv-endpoint="$head:$((29600 + CODISTILL_REPLICA))"' in run
    assert "--max-restarts=1" in run and f"--no-python {PY} -m codistill train" in run
    assert run.rstrip().endswith('"${resume[@]}"')
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    with pytest.raises(ValueError, match="multiple of --nodes"):
        batch_script(_spec(["x"], workers=3, nodes=2))


# -- the script, running outside Slurm (stand-ins for scontrol and codistill) -------------------
FAKE = """#!/bin/bash
echo "$(basename "$0") $*" >> "$CALLS"
[ "$(basename "$0")" = codistill ] && exit "${TRAIN_EXIT:-0}"
exit 0
"""


def _run_script(tmp_path: Path, restart: int | None, train_exit: int) -> tuple[int, list[str], str]:
    """Run the script of a `codistill train` replica as array task 1 of job 7; return its exit
    code, the calls of the stand-ins and its output."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    for name in ("codistill", "scontrol"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    calls.unlink(missing_ok=True)
    script = tmp_path / "job.sh"
    script.write_text(batch_script(_spec(["codistill", *TRAIN[3:]], max_restarts=2)))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "TRAIN_EXIT": str(train_exit),
           "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_NODELIST": "n1"}
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = str(restart)
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    return proc.returncode, calls.read_text().splitlines(), proc.stdout


def test_a_failed_replica_requeues_itself_and_resumes_when_restarted(tmp_path):
    code, calls, out = _run_script(tmp_path, None, train_exit=0)
    assert code == 0 and calls == ["codistill train cfg.yaml --replica 1 --num-replicas 2 --exchange "
                                   "/shared/ex --out /shared/run"]
    assert "replica 1 of 2, job 7_1, restart 0" in out

    code, calls, out = _run_script(tmp_path, None, train_exit=137)
    assert code == 0 and calls[1:] == ["scontrol requeue 7_1"]
    assert "exited with code 137: requeueing it (restart 1 of 2)" in out

    code, calls, _ = _run_script(tmp_path, 1, train_exit=0)  # the requeued task
    assert code == 0 and calls == ["codistill train cfg.yaml --replica 1 --num-replicas 2 --exchange "
                                   "/shared/ex --out /shared/run --resume"]

    code, calls, _ = _run_script(tmp_path, 2, train_exit=3)  # no requeues left
    assert code == 3 and len(calls) == 1 and calls[0].endswith("--resume")


# -- the CLI ------------------------------------------------------------------------------------
def test_launch_slurm_writes_the_script_and_submits_it_with_sbatch(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$*" > {tmp_path}/sbatch-args\necho "42;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run = tmp_path / "run"
    assert main(["launch", "--slurm", "--out", str(run), "--replicas", "2", "--exchange", str(run / "ex"),
                 "--sbatch=--time=1:00", "--", "python", "train.py", "--save", "m{replica}.pt"]) == 0
    assert capsys.readouterr().out == "42\n"
    script = run / "slurm" / "job.sh"
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(script)]
    text = script.read_text()
    assert "#SBATCH --time=1:00" in text and f"{PY} train.py --save m\"$CODISTILL_REPLICA\".pt" in text

    assert main(["launch", "--slurm", "--no-submit", "--out", str(tmp_path / "r2"), "--replicas", "2",
                 "--exchange", "ex", "--", "python", "t.py"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'r2' / 'slurm' / 'job.sh'}\n"


def test_launch_slurm_names_its_problems(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/bash\n"
                                    "echo 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    launch = ["launch", "--replicas", "2", "--exchange", "ex"]
    assert main([*launch, "--slurm", "--out", str(tmp_path / "r"), "--", "python", "t.py"]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused" in err and "invalid partition specified: gpu" in err
    assert main([*launch, "--slurm", "--", "python", "t.py"]) == 2
    assert "--out RUN_DIR is required" in capsys.readouterr().err
    assert main([*launch, "--nodes", "2", "--", "python", "t.py"]) == 2
    assert "--nodes only with --slurm" in capsys.readouterr().err


# -- a real Slurm cluster -----------------------------------------------------------------------
STEPS = 1500  # about 20 s per replica on 2 loaded cores
CKPT_EVERY = 100
TIMEOUT = 150  # seconds for a job array to finish, restarts included

CONFIG = {**copy.deepcopy(TINY_CONFIG), "name": "slurm", "steps": STEPS, "log_every": 5,
          "checkpoint": {"every": CKPT_EVERY, "keep": 2},
          "codistill": {"alpha": 1.0, "burn_in": 10, "exchange_every": 20, "distill": "kl"},
          "eval": {"every": 500, "batch_size": 16, "max_batches": 2}}


def _launch_env(cluster: SlurmCluster) -> dict[str, str]:
    """The environment `codistill launch --slurm` runs in: the cluster's SLURM_CONF, this
    checkout on PYTHONPATH (sbatch passes the environment on to the tasks)."""
    path = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**_env(), "SLURM_CONF": cluster.env["SLURM_CONF"], "PYTHONPATH": path}


def _submit(cluster: SlurmCluster, args: list[str]) -> str:
    proc = subprocess.run([PY, "-m", "codistill", "launch", "--slurm", *args], env=_launch_env(cluster),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"launch --slurm failed\n{proc.stderr}\n{cluster.logs()}"
    return proc.stdout.strip()


def _task_logs(out: Path) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-6000:]}"
                     for p in sorted((out / "slurm").glob("replica-*.log")))


def _wait_done(cluster: SlurmCluster, job: str, out: Path, timeout: float = TIMEOUT) -> None:
    """Wait until no task of array ``job`` is pending or running."""
    deadline = time.monotonic() + timeout
    while cluster.run("squeue", "-h", "-j", job, check=False).strip():
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} not done after {timeout}s\n{cluster.run('squeue', check=False)}\n"
                        f"{_task_logs(out)}\n{cluster.logs()}")
        time.sleep(0.5)


def _train_rows(run: Path, r: int) -> list[dict]:
    """Replica ``r``'s train rows so far (being written: complete lines only)."""
    path = run / f"metrics-replica{r}.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().split("\n")[:-1] if x.strip()]
    return [x for x in rows if x["kind"] == "train"]


def _trainer_pid(cluster: SlurmCluster, replica: int) -> int | None:
    """The pid of replica ``replica``'s `codistill train` process in the cluster, if running."""
    conf = f"SLURM_CONF={cluster.conf}".encode()
    task = f"SLURM_ARRAY_TASK_ID={replica}".encode()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"codistill" in cmd and b"train" in cmd and conf in env and task in env:
            return int(entry)
    return None


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
def test_replicas_as_a_job_array_come_back_from_a_crash_and_a_requeue_and_resume(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    """Replica 1's trainer is SIGKILLed (a crash: its task requeues itself, which --requeue
    allows); replica 0's task is requeued by `scontrol requeue` (a preemption or node failure:
    Slurm kills and requeues it). Both come back with SLURM_RESTART_COUNT=1, resume from their
    newest checkpoint and finish, distilling from each other."""
    cluster = slurm_cluster
    run, ex = tmp_path / "run", tmp_path / "run" / "exchange"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    train = ["python", "-m", "codistill", "train", str(cfg), "--replica", "{replica}", "--num-replicas",
             "{num_replicas}", "--exchange", str(ex), "--out", str(run), "--no-progress"]
    job = _submit(cluster, ["--out", str(run), "--replicas", "2", "--exchange", str(ex),
                            "--max-restarts", "2", "--job-name", "codistill-test", "--", *train])
    try:
        deadline = time.monotonic() + TIMEOUT
        while not all((c := _checkpoints(run, r)) and c[-1] in {x["step"] for x in _train_rows(run, r)}
                      for r in (0, 1)):
            if time.monotonic() > deadline or not cluster.run("squeue", "-h", "-j", job).strip():
                pytest.fail(f"no checkpoint of both replicas\n{_task_logs(run)}\n{cluster.logs()}")
            time.sleep(0.05)
        pid1, pid0 = _trainer_pid(cluster, 1), _trainer_pid(cluster, 0)
        assert pid1 and pid0, _task_logs(run)
        os.kill(pid1, signal.SIGKILL)
        cluster.run("scontrol", "requeue", f"{job}_0")
        _wait_gone(pid1)
        _wait_gone(pid0)
        resumed_from = {r: _checkpoints(run, r)[-1] for r in (0, 1)}  # nothing trains now
        assert max(x["step"] for x in _train_rows(run, 0)) < STEPS, "replica 0 finished first: raise STEPS"
        _wait_done(cluster, job, run)
    finally:
        cluster.run("scancel", job, check=False)
    logs = _task_logs(run)

    for r in (0, 1):
        task = cluster.job(f"{job}_{r}")
        state = (task["JobState"], task["Restarts"], task["ExitCode"])
        assert state == ("COMPLETED", "1", "0:0"), (task, logs)
        log = (run / "slurm" / f"replica-{r}.log").read_text()
        for restart in (0, 1):
            assert f"codistill: replica {r} of 2, job {job}_{r}, restart {restart}," in log, logs
        assert resumed_from[r] > 0
        summary = json.loads((run / f"summary-replica{r}.json").read_text())
        assert (summary["start"], summary["end"]) == (resumed_from[r], STEPS), (summary, logs)
        assert f"replica {r}: steps {resumed_from[r]}..{STEPS}" in log
        _assert_one_row_per_step(_rows(run, r), r)
        last = _by_step(_rows(run, r), "train", r)[STEPS]
        peer = str(1 - r)
        assert last["teacher_versions"][peer] is not None, last  # it distilled from its peer
        assert _exchange_versions(ex, r)[-1] == STEPS
    crashed, requeued = ((run / "slurm" / f"replica-{r}.log").read_text() for r in (1, 0))
    assert "exited with code 137: requeueing it (restart 1 of 2)" in crashed
    assert "requeueing" not in requeued  # Slurm requeued it, not its script


PROBE = """
import json, os, sys
keys = ["CODISTILL_REPLICA", "CODISTILL_NUM_REPLICAS", "CODISTILL_EXCHANGE", "CODISTILL_RESTART",
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SLURM_ARRAY_JOB_ID",
        "SLURMD_NODENAME", "MASTER_ADDR"]
info = {k: os.environ.get(k) for k in keys} | {"argv": sys.argv[1:]}
out = os.path.join(sys.argv[1], f"replica{info['CODISTILL_REPLICA']}-rank{info['RANK']}.json")
with open(out, "w") as f:
    json.dump(info, f)
"""


def _probe_job(cluster: SlurmCluster, tmp_path: Path, launch: list[str], arg: str
               ) -> tuple[str, Path, Path, str]:
    """Submit PROBE (given ``arg``) as 2 replicas with the ``launch`` options, each replica's
    rendezvous on port + R, and wait for it: (job id, the probe's output folder, the
    exchange, every log)."""
    probe, out, ex = tmp_path / "probe.py", tmp_path / "probe-out", tmp_path / "ex"
    probe.write_text(PROBE)
    out.mkdir()
    port = free_port_block(2)
    job = _submit(cluster, ["--out", str(tmp_path / "run"), "--replicas", "2", *launch, "--exchange", str(ex),
                            "--master-port", str(port), "--", "python", str(probe), str(out), arg])
    _wait_done(cluster, job, tmp_path / "run", timeout=120)
    return job, out, ex, f"{_task_logs(tmp_path / 'run')}\n{cluster.logs()}"


@pytest.mark.slow
def test_a_users_script_as_a_torchrun_group_in_each_array_task(slurm_cluster: SlurmCluster,  # noqa: F811
                                                               tmp_path: Path) -> None:
    """W = 2: each array task runs one torchrun agent (srun) with two workers, meeting at the
    task's first node on port + R; ``{replica}`` reaches the script's arguments."""
    cluster = slurm_cluster
    job, out, ex, logs = _probe_job(cluster, tmp_path, ["--workers", "2"], "tag-{replica}-of-{num_replicas}")
    for r in (0, 1):
        task = cluster.job(f"{job}_{r}")
        assert (task["JobState"], task["Restarts"]) == ("COMPLETED", "0"), (task, logs)
        ranks = [json.loads((out / f"replica{r}-rank{rank}.json").read_text()) for rank in (0, 1)]
        for rank, info in enumerate(ranks):
            assert info["CODISTILL_REPLICA"] == str(r) and info["CODISTILL_NUM_REPLICAS"] == "2", info
            assert info["CODISTILL_EXCHANGE"] == str(ex) and info["CODISTILL_RESTART"] == "0", info
            assert (info["RANK"], info["WORLD_SIZE"]) == (str(rank), "2"), info
            assert info["argv"] == [str(out), f"tag-{r}-of-2"], info
            assert info["SLURM_ARRAY_JOB_ID"] == job, info
        assert ranks[0]["TORCHELASTIC_RUN_ID"] == ranks[1]["TORCHELASTIC_RUN_ID"]
    assert len(list(out.iterdir())) == 4


@pytest.mark.slow
def test_a_replica_over_two_nodes_is_one_torchrun_agent_per_node(slurm_cluster: SlurmCluster,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """--nodes 2 --workers 2: each array task holds both nodes of the test cluster, srun starts
    one torchrun agent on each, and the agents meet at the task's first node (by its name) as
    one group of two ranks, one per node."""
    cluster = slurm_cluster
    assert len(cluster.nodes) == 2, cluster.nodes
    job, out, _, logs = _probe_job(cluster, tmp_path, ["--workers", "2", "--nodes", "2"], "{replica}")
    for r in (0, 1):
        task = cluster.job(f"{job}_{r}")
        assert (task["JobState"], task["NumNodes"]) == ("COMPLETED", "2"), (task, logs)
        ranks = [json.loads((out / f"replica{r}-rank{rank}.json").read_text()) for rank in (0, 1)]
        assert {info["SLURMD_NODENAME"] for info in ranks} == set(cluster.nodes), (ranks, logs)
        assert sorted(info["GROUP_RANK"] for info in ranks) == ["0", "1"], ranks  # one agent per node
        assert [(info["RANK"], info["WORLD_SIZE"], info["LOCAL_RANK"]) for info in ranks] == \
            [("0", "2", "0"), ("1", "2", "0")], ranks
        assert ranks[0]["TORCHELASTIC_RUN_ID"] == ranks[1]["TORCHELASTIC_RUN_ID"], ranks  # one rendezvous
        assert all(info["CODISTILL_REPLICA"] == str(r) and info["argv"] == [str(out), str(r)]
                   for info in ranks), ranks
