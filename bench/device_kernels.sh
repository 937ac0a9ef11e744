#!/usr/bin/env bash
# One command for the Sapphire Rapids machine (or any x86-64 Linux box): build
# the core, run the kernel and forward tests natively on every ISA this CPU
# has (AMX included when present, skipping what it lacks), then the kernel
# benchmark with its measured ceilings. Everything lands in $OUT (default
# /tmp/out-kernels): kernels.log (all output), kernels.json, tests_*.log.
#   OUT=/tmp/out-kernels bench/device_kernels.sh
# Needs: python3 with numpy, pybind11, cmake, ninja, pytest (torch and
# transformers only for the tests that compare with them). No network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out-kernels}
mkdir -p "$OUT"
exec > >(tee "$OUT/kernels.log") 2>&1
export PYTHONPATH=python
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "machine"
lscpu | grep -E "Model name|^CPU\(s\)" || true
grep -o -w -E "avx2|avx512f|avx512_vnni|avx512vnni|amx_tile|amx_int8|amx_bf16" /proc/cpuinfo | sort | uniq -c || true

step "build"
BUILD_DIR=build-dev scripts/dev_build.sh || { echo "BUILD FAILED"; exit 1; }
python3 -c "from bitdlm import _core; print('supported ISAs:', _core.supported_isas(), 'picked:', _core.active_isa())"
isas=$(python3 -c "from bitdlm import _core; print(' '.join(_core.supported_isas()))")

step "tests: kernels + forward (default ISA; every supported ISA through the isa fixtures)"
timeout 240 python3 -m pytest -q -rs tests/test_kernels.py tests/test_forward.py 2>&1 | tee "$OUT/tests_default.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for isa in $isas; do
  # (the isa-fixture tests above already ran every ISA; these are the tests
  # that use the process's default ISA: multi-GEMM, threads, dispatch, AMX)
  step "tests with BITDLM_ISA=$isa"
  BITDLM_ISA=$isa timeout 60 python3 -m pytest -q -rs -x tests/test_kernels.py \
    -k "agree or multi or set_isa or env_override or amx or every_token" \
    2>&1 | tee "$OUT/tests_$isa.log" | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
# the clear error on CPUs without AMX (the test itself asserts the message)
echo "BITDLM_ISA=amx on this CPU:"; BITDLM_ISA=amx python3 -c "from bitdlm import _core; print(_core.active_isa())" 2>&1 | tail -1

step "benchmark: ceilings, per-ISA GEMMs at N = 1, 2, 4, 8, 32, 30-layer decode per ISA, lm_head"
bench_isas=$(echo "$isas" | tr ' ' '\n' | grep -v scalar | paste -sd, -)
threads="1,$(nproc)"
[ "$(nproc)" -ge 16 ] && threads="1,16"
timeout 300 python3 bench/kernels.py --isas "$bench_isas" --threads "$threads" --json "$OUT/kernels.json" || status=1

step "done (status $status)"
exit $status
