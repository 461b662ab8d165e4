#!/usr/bin/env bash
# tests/run_as_user.sh [PYTEST ARGS...]: run pytest as the unprivileged hpcdl-alice, as a user
# of a real site would run hpcdl, so that every job the tests submit runs as that user.
#
# Run as root (it switches user with runuser), after `slurm/devcluster/devcluster.sh up` (which
# creates the user). It lets the user reach the venv's interpreter and this checkout
# (`devcluster.sh grant`: search permission on parent folders such as /root of a pyenv Python),
# gives pytest a base temp folder the user owns, no cache in the checkout, the user's HOME, and
# a clean environment. HPCDL_CLUSTER_STARTED=1: the user cannot run `devcluster.sh up` itself.
#
#   HPCDL_VENV      the venv (default: the checkout's .venv)
#   HPCDL_TEST_USER the user (default: hpcdl-alice)
#   KEEP_BASETEMP=1 keep the base temp folder (printed) after the run
#
#   tests/run_as_user.sh -q tests/cluster/test_slurm_jobs.py
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USER_A=${HPCDL_TEST_USER:-hpcdl-alice}
VENV=${HPCDL_VENV:-$REPO/.venv}

die() { echo "run_as_user: error: $*" >&2; exit 2; }

[[ $(id -u) -eq 0 ]] || die "run as root (it runs pytest as $USER_A through runuser)"
[[ -x $VENV/bin/pytest ]] || die "no $VENV/bin/pytest: set HPCDL_VENV to the venv"
getent passwd "$USER_A" >/dev/null || die "no user $USER_A: run 'slurm/devcluster/devcluster.sh up' first"

"$REPO/slurm/devcluster/devcluster.sh" grant "$VENV/bin/python" "$REPO"
HOME_A=$(getent passwd "$USER_A" | cut -d: -f6)
if ! runuser -u "$USER_A" -- "$VENV/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import hpcdl' "$REPO" 2>/dev/null; then
    die "$USER_A cannot run $VENV/bin/python or import hpcdl from $REPO (a file not world-readable?)"
fi

BASE=$(runuser -u "$USER_A" -- mktemp -d "/tmp/hpcdl-pytest-$USER_A.XXXXXX")
if [[ ${KEEP_BASETEMP:-} == 1 ]]; then
    echo "run_as_user: base temp folder $BASE (kept)"
else
    trap 'rm -rf -- "$BASE"' EXIT
fi

cd "$REPO"
extra=()  # HPCDL_TEST_TIMELINE: the timeline of the run (tests/helpers/timeline.py), if asked
[[ -n ${HPCDL_TEST_TIMELINE:-} ]] && extra+=("HPCDL_TEST_TIMELINE=$HPCDL_TEST_TIMELINE")
[[ -n ${HPCDL_ASYNC_CHECKPOINTS:-} ]] && extra+=("HPCDL_ASYNC_CHECKPOINTS=$HPCDL_ASYNC_CHECKPOINTS")  # the suite with async saves on
rc=0
runuser -u "$USER_A" -- env -i \
    PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" \
    HOME="$HOME_A" USER="$USER_A" LOGNAME="$USER_A" LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    PYTHONPATH="$REPO" HPCDL_CLUSTER_STARTED=1 "${extra[@]}" \
    "$VENV/bin/pytest" -p no:cacheprovider --basetemp="$BASE/pytest" "$@" || rc=$?
exit "$rc"
