#!/usr/bin/env bash
# `make wheel-check`: hpcdl as a user gets it. Builds the sdist and, from it, the wheel; installs
# the wheel (with the train, hpo, data and mpi extras, at the versions of env/requirements-cpu.txt)
# into a fresh venv in an empty folder outside the checkout; then, from there, with nothing of the
# checkout on any path: `hpcdl site list` must show the built-in `local` profile from the package,
# `hpcdl init` writes the example configs and the digits data, and the README's main job (the
# digits sweep, local profile) runs to its final test score. Keeps the folder on failure.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$REPO/.venv/bin}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hpcdl-wheel-check.XXXXXX")
trap 'rc=$?; if [ $rc = 0 ]; then rm -rf "$WORK"; else echo "wheel-check: FAILED (rc=$rc), kept $WORK" >&2; fi' EXIT
step() { echo "== wheel-check $(date +%T) (+$SECONDS s): $*"; }

step "build sdist and wheel"
"$BIN/python" -m build --installer uv --outdir "$WORK/dist" "$REPO" >"$WORK/build.log" 2>&1 ||
  { tail -30 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/hpcdl-*.whl)
ls "$WORK"/dist/hpcdl-*.tar.gz >/dev/null
# The listing first: `zipfile -l | grep -q` fails under pipefail when grep exits before the
# listing is written (SIGPIPE), which happens as soon as the wheel is large enough.
LISTING=$("$BIN/python" -m zipfile -l "$WHEEL")
for member in hpcdl/sites/local.yaml hpcdl/configs/sweep_digits.yaml hpcdl/configs/train_digits.yaml; do
  grep -q "^$member " <<<"$LISTING" || { echo "wheel lacks $member" >&2; exit 1; }
done

step "fresh venv + the wheel (uv, pins from env/requirements-cpu.txt as constraints)"
"$BIN/uv" venv --quiet --python "$BIN/python" "$WORK/venv"
LINKS=$(sed -n 's/^--find-links //p' "$REPO/env/requirements-cpu.txt")
"$BIN/uv" pip install --quiet --python "$WORK/venv/bin/python" ${LINKS:+--find-links "$LINKS"} \
  -c "$REPO/env/requirements-cpu.txt" "$WHEEL[train,hpo,data,mpi]"

step "run from an empty folder, nothing of the checkout on any path"
mkdir "$WORK/home"
cd "$WORK/home"
run() {
  env -u PYTHONPATH -u HPCDL_SITE_PATH -u HPCDL_SITE -u VIRTUAL_ENV \
    PATH="$WORK/venv/bin:/usr/local/bin:/usr/bin:/bin" XDG_CONFIG_HOME="$WORK/config" \
    HPCDL_JOB_ROOT="$WORK/jobs" WANDB_MODE=offline "$@"
}
where=$(run python -c "import hpcdl; print(hpcdl.__file__)")
case "$where" in "$WORK/venv/"*) ;; *) echo "hpcdl imported from $where, not the venv" >&2; exit 1 ;; esac
run hpcdl --version
run hpcdl site list | tee "$WORK/site-list.txt"
grep -Eq "^local \(default\) +package +$WORK/venv/.*/hpcdl/sites/local.yaml$" "$WORK/site-list.txt" ||
  { echo "'hpcdl site list' does not show 'local' from the package" >&2; exit 1; }

step "hpcdl init work"
run hpcdl init work
cd work
test -f configs/sweep_digits.yaml && test -f data/digits/test/manifest.json

step "the main job: the digits sweep on the local profile"
run hpcdl sweep run configs/sweep_digits.yaml name=wheel-check resources.site=local --wait \
  --timeout 900 | tee "$WORK/sweep.txt"
grep -Eq "held-out test split: test_acc=0\.[0-9]+" "$WORK/sweep.txt" ||
  { echo "the sweep printed no final test score" >&2; exit 1; }
step "ok"
