#!/usr/bin/env bash
# Every test, in two pytest runs side by side (`make test`): the cluster tests (-m slurm) spend
# most of their time waiting on Slurm (queueing, start-up, grace times, requeue holds), which
# the tests that need no cluster fill. Those run in the background with their output in
# build/test-local.log, printed once both are done; the cluster tests print here as they go.
# Each run has its own --basetemp (pytest cleans its own base directory, not the other's).
# Exit status: non-zero if either run failed. Extra arguments go to both runs.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
mkdir -p build
export HPCDL_CLUSTER_STARTED=${HPCDL_CLUSTER_STARTED:-1}
start=$(date +%s)
echo "tests that need no cluster: in the background, output in build/test-local.log"
"$BIN/pytest" -q -p no:cacheprovider -m "not slurm" --durations=15 \
  --basetemp=/tmp/hpcdl-pytest-local "$@" >build/test-local.log 2>&1 &
local_pid=$!
trap 'kill $local_pid 2>/dev/null' INT TERM
echo "cluster tests (-m slurm):"
"$BIN/pytest" -q -p no:cacheprovider -m slurm --durations=15 \
  --basetemp=/tmp/hpcdl-pytest-slurm "$@"
slurm_rc=$?
echo "cluster tests done after $(($(date +%s) - start)) s (exit $slurm_rc); waiting for the rest"
wait $local_pid
local_rc=$?
echo "=== tests that need no cluster (build/test-local.log) ==="
cat build/test-local.log
echo "all tests: $(($(date +%s) - start)) s; cluster run exit $slurm_rc, no-cluster run exit $local_rc"
[ "$slurm_rc" -eq 0 ] && [ "$local_rc" -eq 0 ]
