#!/usr/bin/env bash
# The wall time of each phase of `make test`, so that a slow or flaky phase shows itself.
#   env/phase-time.sh FILE NAME CMD...   run CMD; append "NAME SECONDS EXIT-STATUS START END"
#                                        to FILE; exit with CMD's status
#   env/phase-time.sh --table FILE       print FILE as a table (what ran, and the total: the
#                                        wall time from the first start to the last end, as
#                                        some phases run side by side)
set -u
if [ "${1-}" = --table ]; then
  [ -s "$2" ] || exit 0
  echo
  awk 'BEGIN { printf "%-14s %9s  %s\n", "phase", "seconds", "result" }
       { printf "%-14s %9.1f  %s\n", $1, $2, ($3 == 0 ? "ok" : "FAILED (exit " $3 ")")
         if (NR == 1 || $4 < first) first = $4
         if (NR == 1 || $5 > last) last = $5 }
       END { printf "%-14s %9.1f  %s\n", "total", last - first, "(wall time, first start to last end)" }' "$2"
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
  'BEGIN { printf "%s %.1f %d %.1f %.1f\n", n, e - s, rc, s, e }' >> "$file"
exit "$status"
