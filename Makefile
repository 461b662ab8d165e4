# hpcdl: the two commands are `make demo` (the main job, local profile) and `make test`
# (install everything, start the dev Slurm cluster, run every test). `.ci/run` calls `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lock lock-check wheel-check docs image cluster cluster-down test test-quick test-scale lint demo clean

# The lock: env/requirements-cpu.txt, made by uv from pyproject.toml (every extra) and
# env/constraints-cpu.txt (torch's CPU build). `make lock` keeps the pins it can; to move them,
# `make lock LOCK_ARGS=--upgrade` (or `--upgrade-package NAME`). tests/cluster/test_lock.py checks it.
LOCK_FLAGS := --all-extras --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--find-links /opt/wheels --emit-find-links -c env/constraints-cpu.txt \
	--custom-compile-command "make lock"
LOCK_IN ?= pyproject.toml
LOCK_OUT ?= env/requirements-cpu.txt
UV_VERSION = $(shell sed -n 's/^uv==//p' env/requirements-cpu.txt)

# uv installs the lock (the same pins as pip would, resolved once by `make lock`; ~10x faster).
# `uv pip install`, not `sync`: packages added by hand to .venv stay. --compile-bytecode: pip
# writes .pyc files at install, uv does not, and where PYTHONDONTWRITEBYTECODE is set (as on
# our CI machines) every process then compiled torch from source: `import torch` took 4.0 s
# instead of 2.6 s, torch._dynamo (which DeepSpeed imports) 8.6 s instead of 4.2 s.
$(STAMP): env/requirements-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv && [ "$$($(BIN)/uv --version | cut -d' ' -f2)" = "$(UV_VERSION)" ] || \
	  $(BIN)/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r env/requirements-cpu.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import hpcdl, torch, deepspeed, h5py, submitit, optuna, wandb, mpi4py"
	touch $(STAMP)

install: $(STAMP)  ## Python environment (venv + the lock + hpcdl, editable), by uv
	@# hpcdl's own bytecode: uv's editable install compiles none, and a worker run by a user who
	@# cannot write the checkout compiles ~80 modules (0.1 s CPU) at every start (bench start)
	$(BIN)/python -m compileall -q hpcdl

lock:  ## regenerate env/requirements-cpu.txt from pyproject.toml (uv pip compile)
	$(BIN)/uv pip compile --quiet $(LOCK_IN) $(LOCK_FLAGS) $(LOCK_ARGS) -o $(LOCK_OUT)

lock-check: install  ## the lock agrees with pyproject.toml (and uv would write the same pins)
	$(BIN)/pytest -q -p no:cacheprovider tests/cluster/test_lock.py

wheel-check: install  ## build sdist + wheel, install the wheel in a fresh venv elsewhere, run the main job
	BIN=$(abspath $(BIN)) env/wheel-check.sh

docs: install  ## the docs site (HTML in build/docs); --strict: any warning (a broken link, ...) fails
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/docs

# Built by root (debootstrap), used by unprivileged users: the container tests run as hpcdl-alice.
image:  ## the charliecloud image of the container tests (debootstrap; cached in /var/tmp/hpcdl-images)
	HPCDL_VENV=$(abspath $(VENV)) env/container/build-image.sh

cluster:  ## apt packages + the dev Slurm cluster (idempotent)
	slurm/devcluster/devcluster.sh up

cluster-down:
	slurm/devcluster/devcluster.sh down

lint: install
	$(BIN)/ruff check hpcdl tests docs/hooks
	$(BIN)/ruff format --check hpcdl tests docs/hooks
	$(BIN)/lint-imports  # the layer contract in pyproject.toml
	$(BIN)/mypy  # the type checker, over hpcdl/ ([tool.mypy] in pyproject.toml)

# `make test` times each phase (env/phase-time.sh) and prints the table at its end, also when
# a phase fails (what ran; then make fails), so that a slow or flaky phase shows itself. The
# phases run in this order and stop at the first failure, as the prerequisites they were did.
TEST_PHASES := install cluster image lint lock-check docs wheel-check
# The tests, in two folders: tests/unit starts no process and needs no cluster (tests/conftest.py
# refuses a process there), seconds in all; tests/cluster holds the end-to-end tests. Every job
# the cluster tests submit is submitted by an unprivileged user (hpcdl-alice, made by
# devcluster.sh up), as on a real site: tests/run_as_user.sh runs them, the container tests
# included. Root runs the end-to-end tests that need no cluster (the local back end) and those
# marked `root` (the cluster's own script, a second user, mounts); root-jobs then fails the run
# if root submitted any cluster job meanwhile. The phases run one after the other: run side by
# side (tried) the cluster tests took 1,309-1,491 s instead of ~950 and the whole run was no
# shorter on 2 cores, and a preemption test timed out under the load.
LOCAL_TESTS := not slurm
USER_TESTS := slurm and not root
ROOT_TESTS := slurm and root
# The end-to-end tests run three at a time, a file per worker (pytest-xdist), the longest files
# first (tests/conftest.py): most of their time is spent waiting, on Slurm or on processes
# starting (two at a time, the local phase used 1.15 of the 2 cores: 400 CPU-s in 345 s).
# tests/helpers/cluster_share.py keeps apart the cluster tests that disturb jobs they do not own
# (a node set DOWN, preemption).
XDIST := -n 3 --dist loadfile --no-loadscope-reorder
PHASE_TIMES ?= build/phase-times.txt
PYTEST_ROOT := env HPCDL_CLUSTER_STARTED=1 $(BIN)/pytest -q -p no:cacheprovider

test:  ## everything: install, start the cluster, all tests; then each phase's wall time
	@mkdir -p $(dir $(PHASE_TIMES)) && : > $(PHASE_TIMES)
	@status=0; \
	for phase in $(TEST_PHASES); do \
	  env/phase-time.sh $(PHASE_TIMES) $$phase $(MAKE) --no-print-directory $$phase || { status=$$?; break; }; \
	done; \
	if [ $$status = 0 ]; then \
	  since=$$(date +%Y-%m-%dT%H:%M:%S); \
	  echo "$(PYTEST_ROOT) tests/unit"; \
	  env/phase-time.sh $(PHASE_TIMES) pytest-unit $(PYTEST_ROOT) tests/unit || status=$$?; \
	  echo "$(PYTEST_ROOT) $(XDIST) --durations=15 -m '$(LOCAL_TESTS)' tests/cluster"; \
	  env/phase-time.sh $(PHASE_TIMES) pytest-local $(PYTEST_ROOT) $(XDIST) --durations=15 -m '$(LOCAL_TESTS)' tests/cluster || status=$$?; \
	  echo "HPCDL_VENV=$(abspath $(VENV)) tests/run_as_user.sh -q $(XDIST) --durations=25 -m '$(USER_TESTS)' tests/cluster"; \
	  HPCDL_VENV=$(abspath $(VENV)) env/phase-time.sh $(PHASE_TIMES) pytest-as-user tests/run_as_user.sh -q $(XDIST) --durations=25 -m '$(USER_TESTS)' tests/cluster || status=$$?; \
	  echo "$(PYTEST_ROOT) --durations=10 -m '$(ROOT_TESTS)' tests/cluster"; \
	  env/phase-time.sh $(PHASE_TIMES) pytest-root $(PYTEST_ROOT) --durations=10 -m '$(ROOT_TESTS)' tests/cluster || status=$$?; \
	  echo "$(BIN)/python tests/root_jobs.py --since $$since"; \
	  env/phase-time.sh $(PHASE_TIMES) root-jobs $(BIN)/python tests/root_jobs.py --since $$since || status=$$?; \
	fi; \
	env/phase-time.sh --table $(PHASE_TIMES); \
	exit $$status

test-quick: install  ## the tests that need no cluster (nor the container image)
	$(BIN)/pytest -q -m "not slurm"

test-unit: install  ## tests/unit alone: no process, no cluster, seconds
	$(BIN)/pytest -q tests/unit

# Minutes-long runs as a user: an elastic job 2->4->2 nodes, PBT, a packed worker cancelled and resumed, an elastic sweep 1->2 nodes, a packed sweep resumed with other lanes.
SCALE_AS_USER := tests/cluster/test_elastic_slurm.py tests/cluster/test_sweep_pbt.py tests/cluster/test_sweep_packing.py tests/cluster/test_sweep_elastic.py tests/cluster/test_pack_resume.py
# Every job of it is submitted by an unprivileged user; root only starts and stops the 64-node instance.
test-scale: install cluster  ## the 2,500-task array, then 10,000 trials on 256 workers on a 64-node instance (~40 min on 2 cores; not in make test)
	HPCDL_VENV=$(abspath $(VENV)) tests/run_as_user.sh -q -s -m 'slurm and scale and not root' --durations=5 tests/cluster/test_split_arrays.py
	slurm/devcluster/devcluster.sh up --instance scale --nodes 64
	HPCDL_VENV=$(abspath $(VENV)) tests/run_as_user.sh -q -s -m 'slurm and scale and not root' --durations=5 tests/cluster/test_scale64.py; \
	  status=$$?; slurm/devcluster/devcluster.sh down --instance scale; exit $$status
	HPCDL_VENV=$(abspath $(VENV)) tests/run_as_user.sh -q -m 'slurm and scale and not root' --durations=5 $(SCALE_AS_USER)

demo: install  ## the main job: digits shards, a 16-trial TPE+ASHA sweep and the final test score (local profile)
	test -f data/digits/test/manifest.json || $(BIN)/hpcdl data shard digits data/digits --chunk-size 4KiB
	$(BIN)/hpcdl sweep run configs/sweep_digits.yaml name=digits-$$(date +%Y%m%d-%H%M%S) resources.site=local --wait --timeout 900

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build dist
