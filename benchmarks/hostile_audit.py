"""Hostile-input audit: plants each case into a real exchange or run directory, runs the real
CLI on it and tabulates what happened. Run by hand (a few minutes on 2 cores)::

    .venv/bin/python benchmarks/hostile_audit.py [--only NAME ...] [--keep DIR]

Every exchange case runs replica 0 of a tiny 2-replica Bible run alone
(``codistill train tiny.yaml --replica 0 --num-replicas 2 --exchange EX``) with the planted
entries in ``EX/replica-1/``, which is where a peer (or anyone who can write there) publishes.
A valid version to tamper with comes from an honest run of replica 1 made first.

Each case states what it must do: ``survive`` (exit 0 with a final evaluation, the planted
entry rejected or survived) or ``refuse`` (a short error naming the problem, exit code 1, 2 or
130, nothing already written changed). A run is *bad* if it hangs past the time limit, grows
past the memory limit, prints a traceback, or does something other than its expectation.
Counts at the end: cases tried, runs that completed, warnings about rejected entries, files
under run directories that changed when nothing should have (data lost).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import yaml
from safetensors.torch import load_file, save_file

TINY = {
    "name": "tiny", "seed": 0, "steps": 30, "replicas": 2, "workers": 1, "batch_size": 8,
    "threads": 1, "log_every": 5,
    "model": {"name": "lstm", "embed_dim": 16, "hidden_dim": 32},
    "data": {"name": "bible", "level": "byte", "seq_len": 32, "max_chars": 200000},
    "optimizer": {"name": "adam", "lr": 0.003},
    "codistill": {"alpha": 1.0, "burn_in": 10, "exchange_every": 5, "distill": "kl"},
    "eval": {"every": 10, "batch_size": 16, "max_batches": 4},
}
MAX_WARNINGS = 10  # warning lines a planted case may cause, however many entries it plants
SLOWDOWN = 3.0  # a planted case may take at most this many times a clean run
TIME_LIMIT = 120.0  # seconds per run (a clean tiny run takes a few)
MEMORY_LIMIT = 3 << 30  # bytes of resident memory per run


@dataclass
class Outcome:
    code: int | None
    seconds: float
    peak_rss: int
    stderr: str
    why_killed: str = ""


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            interrupt_after: Callable[[], bool] | None = None) -> Outcome:
    """Run ``codistill ARGS`` in ``cwd``, watching its time and memory (and sending SIGINT
    once ``interrupt_after()`` is true)."""
    full_env = {**os.environ, **(env or {})}
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "codistill", *args], cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=err, env=full_env)
        ps, peak, why, interrupted = psutil.Process(proc.pid), 0, "", False
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.Error:
                pass
            if peak > MEMORY_LIMIT:
                why = f"memory past {MEMORY_LIMIT >> 20} MB"
            elif time.monotonic() - start > TIME_LIMIT:
                why = f"no exit after {TIME_LIMIT:.0f} s"
            if why:
                proc.kill()
                proc.wait()
                break
            if interrupt_after is not None and not interrupted and interrupt_after():
                proc.send_signal(signal.SIGINT)
                interrupted = True
            time.sleep(0.05)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return Outcome(proc.returncode, time.monotonic() - start, peak, stderr, why)


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (what 'nothing changed' is checked against)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Audit:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = work / "tiny.yaml"
        self.config.write_text(yaml.safe_dump(TINY))
        self.source = work / "source-exchange"  # an honest replica 1's versions
        out = run_cli(["train", str(self.config), "--replica", "1", "--num-replicas", "2",
                       "--exchange", str(self.source), "--out", str(work / "source-run"),
                       "--no-progress"], work)
        if out.code != 0:
            raise SystemExit(f"the honest source run failed:\n{out.stderr}")
        self.valid_step = max(int(p.stem) for p in (self.source / "replica-1").glob("*.json"))
        clean = self.replica0(work / "clean-exchange", work / "clean-run")
        if clean.code != 0:
            raise SystemExit(f"a clean run of replica 0 failed:\n{clean.stderr}")
        self.clean_seconds = clean.seconds
        self.key = secrets.token_hex(32)

    # -- planting helpers -----------------------------------------------------------------
    def valid_version(self, ex: Path, step: int | None = None,
                      change: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
        """Copy the honest version into ``ex`` as ``step`` (weights changed by ``change``,
        the manifest's checksum made to match, as an attacker with write access can)."""
        src = self.source / "replica-1" / f"{self.valid_step:010d}"
        folder = ex / "replica-1"
        folder.mkdir(parents=True, exist_ok=True)
        step = self.valid_step if step is None else step
        name = folder / f"{step:010d}"
        state = load_file(f"{src}.safetensors")
        if change is not None:
            change(state)
        save_file(state, f"{name}.safetensors")
        data = Path(f"{name}.safetensors").read_bytes()
        manifest = json.loads(Path(f"{src}.json").read_text())
        manifest.update(step=step, weights=f"{step:010d}.safetensors",
                        sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))
        Path(f"{name}.json").write_text(json.dumps(manifest))
        return name

    def replica0(self, ex: Path, run: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> Outcome:
        return run_cli(["train", str(self.config), "--replica", "0", "--num-replicas", "2",
                        "--exchange", str(ex), "--out", str(run), "--no-progress", *extra],
                       self.work, env)


Case = Callable[[Audit, Path], tuple[Outcome, str, dict]]  # -> (outcome, expectation, facts)


def exchange_case(plant: Callable[[Audit, Path], None], *extra: str, key: bool = False,
                  must_warn: bool = True) -> Case:
    """Replica 0 alone beside planted entries: it must complete, warn about what was planted
    (at least once if ``must_warn``, at most ``MAX_WARNINGS`` lines), and take no longer than
    ``SLOWDOWN`` × a clean run."""
    def case(audit: Audit, d: Path) -> tuple[Outcome, str, dict]:
        ex, run = d / "ex", d / "run"
        (ex / "replica-1").mkdir(parents=True)
        plant(audit, ex)
        env = {"CODISTILL_EXCHANGE_KEY": audit.key} if key else None
        out = audit.replica0(ex, run, *extra, env=env)
        facts = {"warn": (int(must_warn), MAX_WARNINGS), "slowest": SLOWDOWN * audit.clean_seconds}
        return out, "survive", facts
    return case


def _fifo(a: Audit, ex: Path) -> None:
    os.mkfifo(ex / "replica-1" / "0000000050.json")


def _dev_zero(a: Audit, ex: Path) -> None:
    os.symlink("/dev/zero", ex / "replica-1" / "0000000050.json")


def _dir_manifest(a: Audit, ex: Path) -> None:
    (ex / "replica-1" / "0000000050.json").mkdir()


def _dir_weights(a: Audit, ex: Path) -> None:
    name = a.valid_version(ex, 50)
    os.remove(f"{name}.safetensors")
    os.mkdir(f"{name}.safetensors")


def _self_link(a: Audit, ex: Path) -> None:
    p = ex / "replica-1" / "0000000050.json"
    os.symlink(p, p)


def _deep_json(a: Audit, ex: Path) -> None:
    (ex / "replica-1" / "0000000050.json").write_text("[" * 100_000 + "]" * 100_000)


def _unicode_digits(a: Audit, ex: Path) -> None:
    for name in ("².json", "٣٣.json", "0000000050.json\u0662"):
        (ex / "replica-1" / name).write_text("{}")


def _overflow(a: Audit, ex: Path) -> None:
    def huge(state: dict[str, torch.Tensor]) -> None:
        for v in state.values():
            if v.is_floating_point():
                v.fill_(3e38)
    a.valid_version(ex, 50, huge)


def _nan(a: Audit, ex: Path) -> None:
    def nan(state: dict[str, torch.Tensor]) -> None:
        next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    a.valid_version(ex, 50, nan)


def _many_junk(a: Audit, ex: Path) -> None:
    folder = ex / "replica-1"
    for i in range(20_000):
        (folder / f"{i + 100:010d}.json").write_text("{}")


def _far_future(a: Audit, ex: Path) -> None:
    a.valid_version(ex, 20)
    a.valid_version(ex, 9_999_999_999)


def _link_outside(a: Audit, ex: Path) -> None:
    name = a.valid_version(ex, 50)
    outside = ex.parent / "outside.safetensors"
    shutil.move(f"{name}.safetensors", outside)
    os.symlink(outside, f"{name}.safetensors")


def _sparse(a: Audit, ex: Path) -> None:
    name = a.valid_version(ex, 50)
    with open(f"{name}.safetensors", "r+b") as f:
        f.truncate(20 << 30)
    m = json.loads(Path(f"{name}.json").read_text())
    m["nbytes"] = 20 << 30
    Path(f"{name}.json").write_text(json.dumps(m))


def _unsigned(a: Audit, ex: Path) -> None:
    a.valid_version(ex, 50)  # an honest-looking version, without a signature


def _wrongly_signed(a: Audit, ex: Path) -> None:
    name = a.valid_version(ex, 50)
    m = json.loads(Path(f"{name}.json").read_text())
    m["signature"] = secrets.token_hex(32)
    Path(f"{name}.json").write_text(json.dumps(m))


def _resume_finished(a: Audit, d: Path) -> tuple[Outcome, str, dict]:
    run = d / "run"
    first = run_cli(["train", str(a.config), "--out", str(run), "--no-progress"], a.work)
    assert first.code == 0, first.stderr
    before = snapshot(run)
    out = run_cli(["train", str(a.config), "--out", str(run), "--no-progress", "--resume"], a.work)
    return out, "survive", {"changed": before != snapshot(run), "mention": ["finished"]}


def _resume_changed(a: Audit, d: Path) -> tuple[Outcome, str, dict]:
    run = d / "run"
    first = run_cli(["train", str(a.config), "--out", str(run), "--no-progress", "--stop-at", "10"],
                    a.work)
    assert first.code == 0, first.stderr
    before = snapshot(run)
    out = run_cli(["train", str(a.config), "--out", str(run), "--no-progress", "--resume",
                   "--set", "optimizer.lr=0.01"], a.work)
    return out, "refuse", {"changed": before != snapshot(run), "mention": ["lr"]}


def _config_file(text: str | bytes | None) -> Case:
    def case(a: Audit, d: Path) -> tuple[Outcome, str, dict]:
        cfg = d / "config.yaml"
        if text is None:
            cfg.mkdir()
        elif isinstance(text, bytes):
            cfg.write_bytes(text)
        else:
            cfg.write_text(text)
        out = run_cli(["train", str(cfg), "--out", str(d / "run"), "--no-progress"], a.work)
        return out, "refuse", {"changed": (d / "run").exists(), "mention": [str(cfg)]}
    return case


def _interrupt(a: Audit, d: Path) -> tuple[Outcome, str, dict]:
    run = d / "run"
    cfg = copy.deepcopy(TINY)
    cfg.update(steps=3000, checkpoint={"every": 10})
    path = d / "long.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_cli(["train", str(path), "--out", str(run), "--no-progress"], a.work,
                  interrupt_after=lambda: any((run / "checkpoints").glob("*")))
    return out, "refuse", {"mention": ["--resume"]}


CASES: dict[str, Case] = {
    "fifo-manifest": exchange_case(_fifo),
    "manifest-symlink-to-dev-zero": exchange_case(_dev_zero),
    "directory-named-as-manifest": exchange_case(_dir_manifest),
    "directory-named-as-weights": exchange_case(_dir_weights),
    "self-referencing-symlink": exchange_case(_self_link),
    "deeply-nested-json-manifest": exchange_case(_deep_json),
    "unicode-digit-names": exchange_case(_unicode_digits, must_warn=False),  # not version names
    "weights-overflowing-in-forward": exchange_case(_overflow),
    "weights-overflowing-with-skip": exchange_case(_overflow, "--set", "on_nonfinite=skip"),
    "nan-weights": exchange_case(_nan),
    "20000-junk-manifests": exchange_case(_many_junk),
    "far-future-step": exchange_case(_far_future),
    "weights-symlink-outside-exchange": exchange_case(_link_outside),
    "sparse-20gb-weights": exchange_case(_sparse),
    "unsigned-version-with-key": exchange_case(_unsigned, key=True),
    "wrongly-signed-version-with-key": exchange_case(_wrongly_signed, key=True),
    "resume-a-finished-run": _resume_finished,
    "resume-with-a-changed-lr": _resume_changed,
    "empty-config": _config_file(""),
    "directory-as-config": _config_file(None),
    "binary-config": _config_file(bytes(range(256)) * 4),
    "ctrl-c-mid-run": _interrupt,
}


def warnings_of(out: Outcome) -> int:
    return sum(" WARNING " in ln for ln in out.stderr.splitlines())


def judge(out: Outcome, expect: str, facts: dict) -> tuple[str, str]:
    """(verdict, note): ``ok`` if the run did what the case expects, else ``bad``."""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    if out.why_killed:
        return "bad", out.why_killed
    if "Traceback" in out.stderr:
        return "bad", "traceback: " + (lines[-1] if lines else "")
    if facts.get("changed"):
        return "bad", "files already written were changed"
    missing = [m for m in facts.get("mention", []) if m not in out.stderr]
    if missing:
        return "bad", f"exit {out.code}; its output does not name {missing}: {lines[-1:]}"
    if expect == "survive":
        if out.code != 0:
            return "bad", f"exit {out.code}: {lines[-1:]}"
        low, high = facts.get("warn", (0, MAX_WARNINGS))
        if not low <= warnings_of(out) <= high:
            return "bad", f"completed with {warnings_of(out)} warning lines (want {low}..{high})"
        if out.seconds > facts.get("slowest", float("inf")):
            return "bad", f"completed in {out.seconds:.1f} s, more than {SLOWDOWN}x a clean run"
        return "ok", "completed"
    errors = [ln for ln in lines if "ERROR" in ln or "error" in ln.lower()]
    if out.code in (1, 2, 130) and len(errors) <= 3:
        return "ok", f"exit {out.code}: {(errors or lines or [''])[-1][-120:]}"
    return "bad", f"exit {out.code}: {len(errors)} error lines"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="run only these cases")
    p.add_argument("--keep", type=Path, help="keep every case's folder under this directory")
    a = p.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="codistill-audit-"))
    work.mkdir(parents=True, exist_ok=True)
    audit = Audit(work)
    names = a.only or list(CASES)
    rows, completed, rejected = [], 0, 0
    for name in names:
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        out, expect, facts = CASES[name](audit, d)
        verdict, note = judge(out, expect, facts)
        completed += out.code == 0
        skipped = warnings_of(out)
        rejected += skipped
        rows.append((name, expect, verdict, f"{out.seconds:.1f}", f"{out.peak_rss >> 20}", skipped, note))
        print(f"{verdict:4} {name:34} {out.seconds:6.1f}s {out.peak_rss >> 20:5d} MB  {note}", flush=True)
    bad = sum(r[2] == "bad" for r in rows)
    lost = sum(r[6] == "files already written were changed" for r in rows)
    print("\n| case | expected | verdict | s | peak MB | warnings | note |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print(f"\n{len(rows)} cases: {len(rows) - bad} as expected, {bad} bad; {completed} runs completed; "
          f"{rejected} warning lines; runs with data lost: {lost}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
