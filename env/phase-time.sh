#!/usr/bin/env bash
# The wall time of each phase of `make test`, so that a slow or flaky phase shows itself.
#   env/phase-time.sh FILE NAME CMD...   run CMD; append "NAME SECONDS EXIT-STATUS" to FILE;
#                                        exit with CMD's status
#   env/phase-time.sh --table FILE       print FILE as a table (what ran, and the total)
set -u
if [ "${1-}" = --table ]; then
  [ -s "$2" ] || exit 0
  echo
  awk 'BEGIN { printf "%-12s %9s  %s\n", "phase", "seconds", "result" }
       { total += $2; printf "%-12s %9.1f  %s\n", $1, $2, ($3 == 0 ? "ok" : "FAILED (exit " $3 ")") }
       END { printf "%-12s %9.1f\n", "total", total }' "$2"
  exit 0
fi
if [ $# -lt 3 ]; then
  echo "usage: $0 FILE NAME CMD... | $0 --table FILE" >&2
  exit 2
fi
file=$1 name=$2
shift 2
start=$(date +%s.%N)
"$@"
status=$?
end=$(date +%s.%N)
awk -v n="$name" -v s="$start" -v e="$end" -v rc="$status" \
  'BEGIN { printf "%s %.1f %d\n", n, e - s, rc }' >> "$file"
exit "$status"
