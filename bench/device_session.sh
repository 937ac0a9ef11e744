#!/usr/bin/env bash
# One device call (<= 10 min) for when the Sapphire Rapids machine is scarce: the kernels run
# (bench/device_kernels.sh without llama.cpp: build, native tests on every ISA, kernels,
# AMX sweep, forward per ISA), then bench/device_e2e.sh with the time left before DEADLINE
# seconds (what finished by then is in e2e.json). Results come back as at most 5 files:
# kernels.log, tests.log, e2e.log, results.tar.gz (every JSON / PNG / Markdown) and status.
#   OUT=$OUT DEADLINE=570 bash bench/device_session.sh     # carry .whl and bench/out
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT}"
DEADLINE=${DEADLINE:-570}
T0=$(date +%s)
RES=/tmp/bitdlm-results
mkdir -p "$RES"
OUT=$RES WHEELS=${WHEELS:-.whl} bash bench/device_kernels.sh
kst=$?
echo "kernels status $kst after $(( $(date +%s) - T0 )) s" > "$OUT/status"
left=$(( DEADLINE - ($(date +%s) - T0) - 25 ))
if [ "$kst" -eq 3 ]; then  # bench/host_probe.py found the host unfit for multi-thread timings
  echo "e2e skipped: unfit host (kernels.log, host probe)" >> "$OUT/status"
elif [ "$left" -gt 90 ]; then
  OUT=$RES LIMIT=$left bash bench/device_e2e.sh; echo "e2e status $? after $(( $(date +%s) - T0 )) s" >> "$OUT/status"
else
  echo "e2e skipped: $left s left" >> "$OUT/status"
fi
cp "$RES"/kernels.log "$RES"/tests.log "$RES"/e2e.log "$OUT"/ 2>/dev/null
tar -C "$RES" -czf "$OUT/results.tar.gz" --exclude kernels.log --exclude tests.log --exclude e2e.log .
cat "$OUT/status"
