"""``codistill launch``: run N replicas of your own training script.

Each replica is one child process (a ``torchrun`` group of W workers when W > 1, with its own
master port) in its own process group, started with the environment that tells the script
who it is. ``{replica}`` and ``{num_replicas}`` in the command's arguments become the replica's
index and N (``--out=runs/r{replica}``); an argument that looks like an output path and is the
same for every replica is warned about (``shared_outputs``). A bare ``python``, ``python3`` or
``python3.X`` of this interpreter's version as the command's first word runs this interpreter
(``sys.executable``), not whichever one is first on PATH.

Its output is streamed line by line with a ``[replica R]`` prefix. A replica that exits
non-zero is started again (``CODISTILL_RESTART`` counts the restarts; resuming from a
checkpoint is the script's business) at most ``max_restarts`` times, after a delay that
doubles from ``BACKOFF_FIRST`` up to ``BACKOFF_MAX`` seconds; other replicas are supervised
meanwhile. One that exits within ``QUICK_EXIT`` seconds of its start with the same exit code
twice in a row (an import error, a bad argument) fails for good at once. Ctrl-C or SIGTERM
stops every replica: the signal is passed to each process group, then SIGKILL after
``grace`` seconds.
"""

from __future__ import annotations

import logging
import os
import re
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

QUICK_EXIT = 10.0  # seconds: an exit this soon after the start is a crash at start-up
BACKOFF_FIRST = 1.0  # seconds before the first restart, doubled for each further one
BACKOFF_MAX = 60.0

# Words in an option's name (or a positional argument) that say it names something written.
OUTPUT_WORDS = ("out", "save", "dir", "log", "ckpt", "checkpoint")
# ... and words that say it is read, or shared on purpose (a cache).
INPUT_WORDS = ("data", "cache", "resume", "load", "init", "pretrained", "config", "input")

_PYTHON = re.compile(r"python(?:3(?:\.(\d+))?)?")
_OPTION = re.compile(r"(-{0,2}[A-Za-z_][\w.-]*)=(.*)")  # --name=value, or a Hydra-style name=value
_TOKEN = re.compile(r"[\w./~+@%,{}-]+")  # a word a path could be: no spaces, quotes or URL scheme
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,9}$")


def replica_args(command: Sequence[str], replica: int, num_replicas: int) -> list[str]:
    """``command`` with ``{replica}`` and ``{num_replicas}`` in its arguments replaced."""
    return [a.replace("{replica}", str(replica)).replace("{num_replicas}", str(num_replicas))
            for a in command]


def own_python(command: Sequence[str]) -> list[str]:
    """``command`` with a bare ``python``, ``python3`` or ``python3.X`` (this X) as ``sys.executable``."""
    m = _PYTHON.fullmatch(command[0]) if command else None
    if m and (m.group(1) is None or int(m.group(1)) == sys.version_info.minor):
        return [sys.executable, *command[1:]]
    return list(command)


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def _script_args(command: Sequence[str]) -> list[str]:
    """The arguments after the program and, for a Python interpreter, after its options and script."""
    args = list(command[1:])
    if not command or not _PYTHON.fullmatch(os.path.basename(command[0])):
        return args
    while args and args[0].startswith("-") and args[0] != "-":
        flag = args.pop(0)
        if flag in ("-m", "-c"):
            break
        if flag in ("-W", "-X") and args:
            args.pop(0)
    return args[1:]


def _is_shared_output(name: str | None, value: str) -> bool:
    """Whether ``value``, of option ``name`` (None: a positional argument), names an output."""
    if "{replica}" in value or not _TOKEN.fullmatch(value) or value.startswith("-"):
        return False
    if value.lower() in ("true", "false", "yes", "no", "none", "null"):
        return False
    try:
        float(value)
        return False
    except ValueError:
        pass
    path = os.path.expanduser(value)
    if os.path.isfile(path):  # the script, a data file: read, not written
        return False
    words = _words(name or value)
    if name and any(w.startswith(INPUT_WORDS) for w in words):
        return False
    pathlike = "/" in value or bool(_EXTENSION.search(value))
    if any(w.startswith(OUTPUT_WORDS) or w.endswith("dir") for w in words):
        last = words[-1]
        return pathlike or last.startswith(OUTPUT_WORDS) or last.endswith(("dir", "path", "file"))
    return pathlike and not os.path.exists(path) and os.path.isdir(os.path.dirname(path) or ".")


def shared_outputs(command: Sequence[str]) -> list[str]:
    """The arguments of ``command`` that look like an output path every replica would share.

    A heuristic: an option (``--save x``, ``--out=x``, ``dir=x``) or positional argument whose
    name (a positional's own text) has a word of ``OUTPUT_WORDS`` and whose value looks like a
    path, or any value that looks like a path that does not exist yet in an existing folder.
    Never one with ``{replica}`` in it, an existing file (the script, data), or an option whose
    name has a word of ``INPUT_WORDS``. Reads only whether paths exist.
    """
    found, args = [], _script_args(command)
    while args:
        arg = args.pop(0)
        if m := _OPTION.fullmatch(arg):
            name, value = m.groups()
        elif arg.startswith("-") and args and not args[0].startswith("-"):
            name, value = arg, args.pop(0)
            arg = f"{arg} {value}"
        else:
            name, value = None, arg
        if _is_shared_output(name, value):
            found.append(arg)
    return list(dict.fromkeys(found))


def warn_shared_outputs(command: Sequence[str], replicas: int) -> None:
    """Log a warning for each argument of ``command`` that :func:`shared_outputs` names (N > 1)."""
    if replicas > 1:
        for arg in shared_outputs(command):
            log.warning("launch: %r is the same for every replica, so they would write over each "
                        "other's files; put {replica} in it (e.g. runs/r{replica}) unless they "
                        "should share it", arg)


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


def backoff(restarts: int) -> float:
    """Seconds before restart ``restarts + 1``: ``BACKOFF_FIRST``, doubled per restart, capped."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** restarts)


@dataclass
class _Replica:
    index: int
    proc: subprocess.Popen
    restarts: int
    started: float  # time.monotonic() at the start
    quick_code: int | None = None  # the previous start's exit code if it came within QUICK_EXIT
    readers: list[threading.Thread] = field(default_factory=list)


@dataclass
class _Restart:
    index: int
    restarts: int
    quick_code: int | None
    when: float  # time.monotonic() to start it at


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
        self.command = own_python(command)
        if self.command[0] != command[0]:
            log.info("launch: running %r as %s (this interpreter, not the first on PATH)",
                     command[0], sys.executable)
        warn_shared_outputs(self.command, replicas)
        self.replicas, self.workers, self.max_restarts = replicas, workers, max_restarts
        self.exchange = exchange if "://" in exchange else os.path.abspath(exchange)
        self.master_port, self.grace = master_port, grace
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._write_lock = threading.Lock()
        self._running: dict[int, _Replica] = {}
        self._restarts: dict[int, _Restart] = {}  # waiting out their backoff
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
            while (self._running or self._restarts) and self._stop_signal is None:
                for rep in list(self._running.values()):
                    code = rep.proc.poll()
                    if code is not None:
                        self._ended(rep, code, failed)
                for due in [r for r in self._restarts.values() if r.when <= time.monotonic()]:
                    del self._restarts[due.index]
                    self._start(due.index, due.restarts, due.quick_code)
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
        """Log how replica ``rep`` ended; schedule its restart, or count it as failed for good."""
        ran = time.monotonic() - rep.started
        del self._running[rep.index]
        self._join_readers(rep)
        quick = code != 0 and ran < QUICK_EXIT
        if code == 0:
            log.info("replica %d finished", rep.index)
        elif quick and rep.quick_code == code:
            log.error("replica %d failed for good: %s twice in a row, each time within %g s of its start "
                      "(a crash at start-up, such as an import error or a bad argument, is not retried; "
                      "see its output above)", rep.index, _exit_text(code), QUICK_EXIT)
            failed.append(rep.index)
        elif rep.restarts < self.max_restarts:
            delay = backoff(rep.restarts)
            log.warning("replica %d stopped with %s; restart %d of %d in %g s (it ran %.1f s)", rep.index,
                        _exit_text(code), rep.restarts + 1, self.max_restarts, delay, ran)
            self._restarts[rep.index] = _Restart(rep.index, rep.restarts + 1, code if quick else None,
                                                 time.monotonic() + delay)
        else:
            log.error("replica %d failed for good: %s after %d restart(s)", rep.index, _exit_text(code),
                      rep.restarts)
            failed.append(rep.index)

    def _start(self, index: int, restarts: int, quick_code: int | None = None) -> None:
        port = self.master_port + index if self.master_port else free_ports(1)[0]
        env = {**os.environ, ENV_REPLICA: str(index), ENV_NUM_REPLICAS: str(self.replicas),
               ENV_EXCHANGE: self.exchange, ENV_RESTART: str(restarts), "PYTHONUNBUFFERED": "1"}
        command = replica_args(self.command, index, self.replicas)
        proc = subprocess.Popen(replica_command(command, self.workers, port), env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        rep = _Replica(index, proc, restarts, time.monotonic(), quick_code)
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

