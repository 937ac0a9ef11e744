#!/usr/bin/env bash
# One command for the Sapphire Rapids machine: build, the AMX variant tests,
# the cross-ISA forward test, tests/test_forward.py under every ISA >= avx2
# (with the failure text, so a transformers mismatch can be told apart from a
# kernel bug), then the AMX variant sweep. ~6-8 minutes on 16 cores.
#   OUT=/tmp/out-amx bench/device_amx.sh
# Writes $OUT/amx.log (everything), $OUT/amx_sweep.json, $OUT/tests_*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out-amx}
mkdir -p "$OUT"
exec > >(tee "$OUT/amx.log") 2>&1
export PYTHONPATH=python
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "build"
BITDLM_BENCH_KERNELS=1 BUILD_DIR=build-dev scripts/dev_build.sh || { echo "BUILD FAILED"; exit 1; }
python3 -c "from bitdlm import _core; print('supported ISAs:', _core.supported_isas(), 'picked:', _core.active_isa(), 'amx_min_tokens:', _core.amx_min_tokens())"
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)" || true

step "AMX kernel and its bench-only variants bit-exact + logits identical across ISAs"
timeout 240 python3 -m pytest -q -rs tests/test_isa_forward.py tests/test_kernels.py -k "amx or isa" \
  2>&1 | tee "$OUT/tests_amx.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for isa in $(python3 -c "from bitdlm import _core; print(' '.join(i for i in _core.supported_isas() if i != 'scalar'))"); do
  step "tests/test_forward.py with BITDLM_ISA=$isa"
  BITDLM_ISA=$isa timeout 150 python3 -m pytest -q -rf --tb=short tests/test_forward.py \
    2>&1 | tee "$OUT/tests_forward_$isa.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

step "AMX variant sweep"
timeout 300 python3 bench/amx_sweep.py --json "$OUT/amx_sweep.json" || status=1
step "done (status $status)"
exit $status
