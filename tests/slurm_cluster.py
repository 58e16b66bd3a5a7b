"""A test cluster on this host: munged, slurmctld and two slurmd of their own.

:func:`start_cluster` writes a throwaway ``slurm.conf``: this host as two nodes, each
sized by ``slurmd -C`` and named by one of two names that resolve to it (its host name and
``localhost``), so that a job over both nodes finds its first node by name as on a real
cluster; linuxproc process tracking, no cgroups, no accounting; requeued jobs eligible again
after ``CRED_EXPIRE`` seconds instead of 120. It writes a munge key and starts ``munged -F``,
``slurmctld -D`` and one ``slurmd -D -N NODE`` per node on free ports, everything under
``BASE/<session>``. Clients
find the cluster through ``SLURM_CONF`` (:attr:`SlurmCluster.env`); nothing in /etc is used.
``BASE`` is a short path under /tmp: munge's socket path must be short and its directories
traversable by everyone, which pytest's tmp dirs (mode 0700) are not.

A session that died without stopping its cluster (its pytest process is gone) leaves a
directory behind: the next start stops the processes that name it and removes it.
:func:`slurm_cluster` is the session fixture; if the cluster cannot start it fails the tests
with the daemons' logs.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BASE = Path("/tmp/codistill-slurm")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")
CRED_EXPIRE = 5  # seconds a requeued job waits before it is eligible again (Slurm's default: 120)
START_TIMEOUT = 60.0  # seconds for the nodes to show up idle
SECOND_NODE = "localhost"  # another name of this host: a second node beside its host name

CONF = """\
ClusterName=codistilltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/sock/munge.socket,cred_expire={cred_expire}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
{nodes}PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


class ClusterError(RuntimeError):
    """The cluster could not start (missing programs, a daemon that died, a node not idle)."""


def _program(name: str) -> str | None:
    """The path of ``name`` on PATH, or in /usr/sbin or /sbin (daemons, often off a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def free_port_block(count: int) -> int:
    """A port p with p .. p + count - 1 free now, below Linux's ephemeral range (32768-60999:
    a port picked there can be taken by any outgoing connection before its server binds it)."""
    rng = random.Random()
    while True:
        first = rng.randrange(20000, 32000 - count)
        socks = [socket.socket() for _ in range(count)]
        try:
            for i, s in enumerate(socks):
                s.bind(("", first + i))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line or environment contains ``text`` (a session's directory)."""
    found, needle = [], text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                if needle in Path(f"/proc/{entry}/{part}").read_bytes():
                    found.append(int(entry))
                    break
            except OSError:
                pass
    return found


def _kill_all(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still alive after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def reap_stale_sessions() -> None:
    """Stop the processes of, and remove, every session under ``BASE`` whose pytest is gone."""
    if not BASE.is_dir():
        return
    for session in BASE.iterdir():
        try:
            owner = int((session / "owner").read_text())
        except (OSError, ValueError):
            owner = 0
        if owner and _pid_alive(owner):
            continue  # another test session's cluster, still in use
        _kill_all(_pids_naming(str(session)))
        shutil.rmtree(session, ignore_errors=True)


def node_line() -> str:
    """This host as a slurm.conf node (``slurmd -C``'s first line: name, CPUs, sockets, memory)."""
    out = subprocess.run([_program("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    return line.strip()


class SlurmCluster:
    """The daemons of one session; ``env`` points Slurm's clients at them."""

    def __init__(self, path: Path, nodes: tuple[str, ...] = ()) -> None:
        self.path = path
        self.nodes = nodes
        self.conf = path / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    # -- clients ---------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True) -> str:
        """A Slurm client command's stdout (``check``: fail on a non-zero exit)."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)}: exit code {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields of one job (or array task ``ID_R``)."""
        fields = {}
        for word in self.run("scontrol", "show", "job", "-o", job_id).split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        return fields

    def logs(self, tail: int = 4000) -> str:
        """The end of every daemon's log and output, for failure messages."""
        parts = []
        for f in sorted((self.path / "log").glob("*")):
            parts.append(f"--- {f.name} ---\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- daemons ---------------------------------------------------------------------------
    def _start(self, name: str, args: list[str]) -> None:
        with open(self.path / "log" / f"{name}.out", "wb") as out:
            self.procs[name] = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode}\n{self.logs()}")

    def _wait(self, what: str, ready, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterError(f"no {what} after {timeout:g}s\n{self.logs()}")
            time.sleep(0.2)

    def _node_state(self) -> str:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return proc.stdout.strip()

    def start(self) -> None:
        p = self.path
        self._start("munged", [_program("munged"), "-F", "-S", f"{p}/sock/munge.socket",
                               f"--key-file={p}/key/munge.key", f"--pid-file={p}/sock/munged.pid",
                               f"--seed-file={p}/key/munged.seed", f"--log-file={p}/log/munged.log"])
        self._wait("munge socket", (p / "sock" / "munge.socket").exists)
        self._start("slurmctld", [_program("slurmctld"), "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._start(f"slurmd-{node}", [_program("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait("idle nodes in sinfo", lambda: self._node_state().split() == ["idle"] * len(self.nodes))

    def stop(self) -> None:
        """Cancel every job, stop the daemons, kill what is left of this session, remove it."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 20
                while self.run("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in (*(f"slurmd-{node}" for node in self.nodes), "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # What is left: job processes and slurmstepd, SLURM_CONF=<this path> in their environment.
        _kill_all(_pids_naming(str(self.path)))
        shutil.rmtree(self.path, ignore_errors=True)


def _make_session_dir() -> Path:
    BASE.mkdir(mode=0o755, exist_ok=True)
    os.chmod(BASE, 0o755)
    path = Path(tempfile.mkdtemp(prefix="s", dir=BASE))
    os.chmod(path, 0o755)  # munged: the socket's directories must be traversable by all
    (path / "owner").write_text(str(os.getpid()))
    for sub, mode in (("key", 0o700), ("sock", 0o755), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
        (path / sub).mkdir(mode=mode)
        os.chmod(path / sub, mode)
    key = path / "key" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    return path


def start_cluster() -> SlurmCluster:
    """Start a fresh one-host cluster (see the module's docstring); raises :class:`ClusterError`."""
    missing = [p for p in (*DAEMONS, *CLIENTS) if _program(p) is None]
    if missing:
        raise ClusterError(f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm "
                           "munge; `make install` does it as root)")
    if os.geteuid() != 0:
        raise ClusterError("the test cluster runs slurmd as root (it starts jobs as their user): run as root")
    reap_stale_sessions()
    path = _make_session_dir()
    node = node_line()
    host, sizes = node.split()[0].split("=", 1)[1], node.split(maxsplit=1)[1]
    names = (host, SECOND_NODE)
    if host == SECOND_NODE:
        raise ClusterError(f"this host is named {host!r}: the test cluster needs a second name for it")
    ctld_port = free_port_block(1 + len(names))  # slurmctld, then each node's slurmd
    nodes = "".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={ctld_port + 1 + i} "
                    f"{sizes} State=UNKNOWN\n" for i, name in enumerate(names))
    cluster = SlurmCluster(path, names)
    cluster.conf.write_text(CONF.format(host=host, dir=path, ctld_port=ctld_port, cred_expire=CRED_EXPIRE,
                                        nodes=nodes, names=",".join(names)))
    try:
        cluster.start()
    except ClusterError:
        cluster.stop()
        raise
    except BaseException as e:
        logs = cluster.logs()
        cluster.stop()
        raise ClusterError(f"the test Slurm cluster did not start: {e!r}\n{logs}") from e
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A one-host Slurm cluster for the session; the tests fail (with its logs) if it cannot start."""
    try:
        cluster = start_cluster()
    except (ClusterError, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"Slurm: {e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
