"""``codistill launch --slurm``: N replicas as one Slurm job array, one array task per replica.

:func:`batch_script` writes the batch script (a pure function of a :class:`SlurmSpec`),
:func:`submit` hands it to ``sbatch --parsable`` and returns the job id. Array task R is
replica R: ``CODISTILL_REPLICA`` is ``SLURM_ARRAY_TASK_ID``, ``{replica}`` in the command's
arguments becomes ``$CODISTILL_REPLICA`` and ``{num_replicas}`` N (as ``codistill launch``
without Slurm does). A task runs the command itself (W = 1), or one ``torchrun`` agent per node
under ``srun`` (W > 1), the agents meeting at the task's first node.

Restarts: a task whose command exits non-zero requeues itself (``scontrol requeue``) while
``SLURM_RESTART_COUNT`` is below ``max_restarts``; ``--requeue`` also lets Slurm requeue it
after a node failure or a preemption. A requeued task starts the script again with
``SLURM_RESTART_COUNT`` > 0, passed on as ``CODISTILL_RESTART``; a ``codistill train`` command
then gets ``--resume`` (a user's script reads ``CODISTILL_RESTART``). A task stopped by a
signal (``scancel``, its time limit, an outside requeue) does not requeue itself.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .env import ENV_EXCHANGE, ENV_KEY, ENV_NUM_REPLICAS, ENV_REPLICA, ENV_RESTART
from .launcher import own_python, warn_shared_outputs

log = logging.getLogger(__name__)

SCRIPT_NAME = "job.sh"  # in the Slurm folder of the run directory, with the tasks' logs
LOG_PATTERN = "replica-%a.log"  # %a: the array task id, i.e. the replica


class SubmitError(ValueError):
    """``sbatch`` refused the batch script (a bad partition, account, option …)."""


@dataclass(frozen=True)
class SlurmSpec:
    """What the batch script runs: ``command`` as ``replicas`` array tasks of ``workers``
    processes over ``nodes`` nodes each; logs and the script go in ``log_dir``."""

    command: tuple[str, ...]
    replicas: int
    exchange: str
    log_dir: str
    workers: int = 1
    nodes: int = 1
    max_restarts: int = 3
    master_port: int = 29500  # replica R's torchrun rendezvous: port + R on its first node
    job_name: str = "codistill"
    sbatch_args: tuple[str, ...] = ()  # extra #SBATCH lines: --partition=gpu, --time=…

    def check(self) -> None:
        if not self.command:
            raise ValueError("launch: no command given (e.g. -- python train.py)")
        if self.replicas < 1 or self.workers < 1 or self.nodes < 1 or self.max_restarts < 0:
            raise ValueError("launch: --replicas, --workers and --nodes must be >= 1, --max-restarts >= 0")
        if self.workers % self.nodes:
            raise ValueError(f"launch: --workers {self.workers} (per replica) must be a multiple of "
                             f"--nodes {self.nodes}: each node runs workers/nodes processes")


def is_codistill_train(command: Sequence[str]) -> bool:
    """Whether ``command`` is ``codistill train …`` or ``python -m codistill train …``."""
    words = list(command)
    if words and os.path.basename(words[0]) == "codistill":
        rest = words[1:]
    elif len(words) > 2 and words[1:3] == ["-m", "codistill"]:
        rest = words[3:]
    else:
        return False
    rest = [w for w in rest if w not in ("-v", "--verbose")]
    return bool(rest) and rest[0] == "train"


def shell_command(command: Sequence[str], num_replicas: int) -> str:
    """``command`` as one quoted shell line: ``{num_replicas}`` becomes N and ``{replica}``
    ``"$CODISTILL_REPLICA"`` (expanded in each array task)."""
    words = []
    for arg in command:
        parts = arg.replace("{num_replicas}", str(num_replicas)).split("{replica}")
        words.append(f'"${ENV_REPLICA}"'.join(shlex.quote(p) if p else "" for p in parts))
    return " ".join(words)


def _header(spec: SlurmSpec) -> list[str]:
    options = [f"--job-name={spec.job_name}", f"--array=0-{spec.replicas - 1}", f"--nodes={spec.nodes}",
               "--ntasks-per-node=1", "--requeue", "--open-mode=append",
               f"--output={os.path.join(spec.log_dir, LOG_PATTERN)}", *spec.sbatch_args]
    return [f"#SBATCH {shlex.quote(o)}" for o in options]


def _run_line(spec: SlurmSpec, train: bool) -> list[str]:
    """The lines that run the replica: the command, or srun + torchrun when W > 1."""
    command = shell_command(spec.command, spec.replicas) + (' "${resume[@]}"' if train else "")
    if spec.workers == 1:
        return [command]
    torchrun = shlex.join([sys.executable, "-m", "torch.distributed.run"])
    return [
        "# One torchrun agent per node (srun: one task per node), meeting at the first node.",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi',
        f"srun --kill-on-bad-exit=1 {torchrun} --nnodes=\"$SLURM_NNODES\" "
        f"--nproc-per-node={spec.workers // spec.nodes} \\",
        f"    --rdzv-backend=c10d --rdzv-endpoint=\"$head:$(({spec.master_port} + {ENV_REPLICA}))\" "
        f"--rdzv-id=\"codistill-$SLURM_JOB_ID-${ENV_RESTART}\" --max-restarts={spec.max_restarts} \\",
        f"    --no-python {command}",
    ]


def batch_script(spec: SlurmSpec) -> str:
    """The batch script of ``spec``: one array task per replica (see the module's docstring)."""
    spec.check()
    train = is_codistill_train(spec.command)
    k = spec.max_restarts
    task = "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    lines = [
        "#!/bin/bash",
        f"# Written by `codistill launch --slurm`: {spec.replicas} replica(s), one array task each, "
        f"{spec.workers} worker(s) over {spec.nodes} node(s) per replica.",
        *_header(spec),
        "",
        f"export {ENV_REPLICA}=$SLURM_ARRAY_TASK_ID {ENV_NUM_REPLICAS}={spec.replicas} "
        f"{ENV_EXCHANGE}={shlex.quote(spec.exchange)}",
        f"export {ENV_RESTART}=${{SLURM_RESTART_COUNT:-0}} PYTHONUNBUFFERED=1",
        f'echo "codistill: replica ${ENV_REPLICA} of ${ENV_NUM_REPLICAS}, job {task}, '
        f'restart ${ENV_RESTART}, on $SLURM_JOB_NODELIST, $(date -Is)"',
        "",
    ]
    if train:
        lines += ["# A requeued task continues from its newest checkpoint (none yet: it starts afresh).",
                  "resume=()",
                  f'if [ "${ENV_RESTART}" -gt 0 ]; then resume=(--resume); fi', ""]
    lines += [
        "# scancel, the time limit or an outside requeue (SIGTERM): stop, do not requeue.",
        "trap 'echo \"codistill: stopped by a signal\"; exit 143' TERM INT",
        "",
        *_run_line(spec, train),
        "code=$?",
        f'if [ "$code" -ne 0 ] && [ "${ENV_RESTART}" -lt {k} ]; then',
        f'    echo "codistill: replica ${ENV_REPLICA} exited with code $code: requeueing it '
        f'(restart $(({ENV_RESTART} + 1)) of {k})"',
        f'    scontrol requeue "{task}" && exit 0',
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def write_script(spec: SlurmSpec) -> str:
    """Write ``spec``'s batch script into ``spec.log_dir`` (created); return its path."""
    os.makedirs(spec.log_dir, exist_ok=True)
    path = os.path.join(spec.log_dir, SCRIPT_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(batch_script(spec))
    os.chmod(path, 0o755)
    return path


def submit(script: str, sbatch: str = "sbatch") -> str:
    """Submit ``script`` with ``sbatch --parsable``; return the job id."""
    proc = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {script} (exit code {proc.returncode}): "
                          f"{proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # "id" or "id;cluster"
    log.info("submitted %s as Slurm job %s", script, job_id)
    return job_id


def make_spec(command: Sequence[str], replicas: int, exchange: str, out: str, **options: Any) -> SlurmSpec:
    """The spec of ``codistill launch --slurm``: absolute paths (the tasks start elsewhere),
    this interpreter for a bare ``python``, a warning for outputs every replica would share,
    the exchange key (passed on to every task) checked once here."""
    if ENV_KEY in os.environ:
        from .exchange.signing import load_keys

        load_keys()
    command = own_python(command)
    if not is_codistill_train(command):
        warn_shared_outputs(command, replicas)  # codistill train keeps each replica's files apart
    elif not any(a == "--replica" or a.startswith("--replica=") for a in command):
        raise ValueError("launch --slurm: give `codistill train` its replica: add --replica {replica} "
                         "--num-replicas {num_replicas} --exchange DIR to its arguments")
    exchange = exchange if "://" in exchange else os.path.abspath(exchange)
    log_dir = os.path.join(os.path.abspath(out), "slurm")
    return SlurmSpec(tuple(command), replicas, exchange, log_dir, **options)
