"""``codistill launch``: run N replicas of your own training script.

Each replica is one child process (a ``torchrun`` group of W workers when W > 1, with its own
master port) in its own process group, started with the environment that tells the script
who it is. Its output is streamed line by line with a ``[replica R]`` prefix. A replica that
exits non-zero is started again (``CODISTILL_RESTART`` counts the restarts; resuming from a
checkpoint is the script's business) at most ``max_restarts`` times. Ctrl-C or SIGTERM stops
every replica: the signal is passed to each process group, then SIGKILL after ``grace``
seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

# The environment of every replica (read by the script, Codistiller.from_env, shard_dataset);
# re-exported here: `codistill.launcher.replica_env()` is documented.
from .env import (  # noqa: F401
    ENV_EXCHANGE,
    ENV_KEY,
    ENV_NUM_REPLICAS,
    ENV_REPLICA,
    ENV_RESTART,
    ENV_RUN_ID,
    replica_env,
)

log = logging.getLogger(__name__)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on this host now."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def replica_command(command: Sequence[str], workers: int, port: int) -> list[str]:
    """The command one replica runs: ``command`` itself, or under torchrun when ``workers`` > 1."""
    if workers == 1:
        return list(command)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={workers}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={port}", "--no-python", *command]


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _descendants(pid: int) -> list[int]:
    """Pids below ``pid`` in the process tree (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class _Replica:
    index: int
    proc: subprocess.Popen
    restarts: int
    readers: list[threading.Thread] = field(default_factory=list)


class Launcher:
    """Starts and supervises ``replicas`` copies of ``command``; ``run()`` returns the exit code.

    ``master_port``: replica R's torchrun group uses ``master_port + R`` (default: free ports).
    ``out``/``err``: where the children's prefixed stdout/stderr go (default: this process's).
    """

    def __init__(self, command: Sequence[str], replicas: int, exchange: str, workers: int = 1,
                 max_restarts: int = 3, master_port: int | None = None, grace: float = 10.0,
                 out: TextIO | None = None, err: TextIO | None = None) -> None:
        if not command:
            raise ValueError("launch: no command given (e.g. -- python train.py)")
        if replicas < 1 or workers < 1 or max_restarts < 0:
            raise ValueError("launch: --replicas and --workers must be >= 1, --max-restarts >= 0")
        if ENV_KEY in os.environ:  # passed on to every replica: one clear error here, not N
            from .exchange.signing import load_keys

            load_keys()
        self.command = list(command)
        self.replicas, self.workers, self.max_restarts = replicas, workers, max_restarts
        self.exchange = exchange if "://" in exchange else os.path.abspath(exchange)
        self.master_port, self.grace = master_port, grace
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._write_lock = threading.Lock()
        self._running: dict[int, _Replica] = {}
        self._stop_signal: int | None = None

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask ``run()`` to stop every replica, passing them ``signum`` (safe from a signal handler)."""
        self._stop_signal = signum

    def run(self) -> int:
        """Run until every replica has finished or failed for good (1), or until stopped (128 + signal)."""
        restore = self._catch_signals()
        failed: list[int] = []
        try:
            for r in range(self.replicas):
                self._start(r, restarts=0)
            while self._running and self._stop_signal is None:
                for rep in list(self._running.values()):
                    code = rep.proc.poll()
                    if code is not None:
                        self._ended(rep, code, failed)
                time.sleep(0.05)
            if self._stop_signal is not None:
                log.info("stopping %d replica(s) (%s)", len(self._running),
                         signal.Signals(self._stop_signal).name)
                return 128 + self._stop_signal
            return 1 if failed else 0
        finally:
            self._terminate(self._stop_signal or signal.SIGTERM)
            restore()

    def _ended(self, rep: _Replica, code: int, failed: list[int]) -> None:
        del self._running[rep.index]
        self._join_readers(rep)
        if code == 0:
            log.info("replica %d finished", rep.index)
        elif rep.restarts < self.max_restarts:
            log.warning("replica %d stopped with %s; restart %d of %d", rep.index, _exit_text(code),
                        rep.restarts + 1, self.max_restarts)
            self._start(rep.index, rep.restarts + 1)
        else:
            log.error("replica %d failed for good: %s after %d restart(s)", rep.index, _exit_text(code),
                      rep.restarts)
            failed.append(rep.index)

    def _start(self, index: int, restarts: int) -> None:
        port = self.master_port + index if self.master_port else free_ports(1)[0]
        env = {**os.environ, ENV_REPLICA: str(index), ENV_NUM_REPLICAS: str(self.replicas),
               ENV_EXCHANGE: self.exchange, ENV_RESTART: str(restarts), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(replica_command(self.command, self.workers, port), env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        rep = _Replica(index, proc, restarts)
        for pipe, sink in ((proc.stdout, self.out), (proc.stderr, self.err)):
            t = threading.Thread(target=self._pump, args=(pipe, f"[replica {index}] ", sink), daemon=True)
            t.start()
            rep.readers.append(t)
        self._running[index] = rep
        log.debug("replica %d started (pid %d): %s", index, proc.pid, " ".join(proc.args))

    def _pump(self, pipe: TextIO, prefix: str, sink: TextIO) -> None:
        with pipe:
            for line in pipe:
                with self._write_lock:
                    sink.write(prefix + line if line.endswith("\n") else f"{prefix}{line}\n")
                    sink.flush()

    def _join_readers(self, rep: _Replica) -> None:
        for t in rep.readers:  # a grandchild may still hold the pipe open: do not wait forever
            t.join(timeout=self.grace)

    def _terminate(self, signum: int) -> None:
        """Pass ``signum`` to every running replica's process group; SIGKILL what outlives ``grace``."""
        reps = list(self._running.values())
        self._running.clear()
        trees = {rep.index: _descendants(rep.proc.pid) for rep in reps}
        for rep in reps:
            _kill(rep.proc.pid, signum, group=True)
        deadline = time.monotonic() + self.grace
        for rep in reps:
            try:
                rep.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("replica %d did not stop within %.0f s: killing it", rep.index, self.grace)
                for pid in trees[rep.index]:  # e.g. torchrun's workers, in sessions of their own
                    _kill(pid, signal.SIGKILL)
            _kill(rep.proc.pid, signal.SIGKILL, group=True)  # anything left in its group
            rep.proc.wait()
            self._join_readers(rep)

    def _catch_signals(self):
        """Route SIGINT/SIGTERM to ``stop`` while running (main thread only); returns the undo."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {s: signal.signal(s, lambda signum, _frame: self.stop(signum))
               for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in old.items()]

