# hpcdl: the two commands are `make demo` (the main job, local profile) and `make test`
# (install everything, start the dev Slurm cluster, run every test). `.ci/run` calls `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install cluster cluster-down test test-quick lint demo clean

$(STAMP): env/requirements-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r env/requirements-cpu.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import hpcdl, torch, deepspeed, h5py, submitit, optuna, wandb, mpi4py"
	touch $(STAMP)

install: $(STAMP)  ## Python environment (venv + pinned requirements + hpcdl, editable)

cluster:  ## apt packages + the dev Slurm cluster (idempotent)
	slurm/devcluster/devcluster.sh up

cluster-down:
	slurm/devcluster/devcluster.sh down

lint: install
	$(BIN)/ruff check hpcdl tests
	$(BIN)/ruff format --check hpcdl tests
	$(BIN)/lint-imports  # the layer contract in pyproject.toml

test: install cluster lint  ## everything: install, start the cluster, all tests
	HPCDL_CLUSTER_STARTED=1 $(BIN)/pytest -q

test-quick: install  ## the tests that need no cluster
	$(BIN)/pytest -q -m "not slurm"

demo: install  ## the main job: digits shards, a 16-trial TPE+ASHA sweep and the final test score (local profile)
	test -f data/digits/test/manifest.json || $(BIN)/hpcdl data shard digits data/digits --chunk-size 4KiB
	$(BIN)/hpcdl sweep run configs/sweep_digits.yaml name=digits-$$(date +%Y%m%d-%H%M%S) resources.site=local --wait --timeout 900

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
