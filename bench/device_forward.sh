#!/usr/bin/env bash
# One command for the AVX-512 / AMX machine (DEVELOPERS.md): build, the forward
# tests (small ops bit-identical on every ISA the CPU has, forward vs
# transformers, attention across ISAs), then bench/forward.py on the 2B-shaped
# synthetic model (int8 lm_head, 512 cached) for BITDLM_ISA=avx2, avx512vnni and
# the dispatcher's best. Everything lands in $OUT; no network needed.
#
#   OUT=/tmp/out bench/device_forward.sh            # THREADS=16 REPS=7 by default
#   THREADS=2 REPS=1 SHAPE=tiny OUT=/tmp/out-modelops bench/device_forward.sh   # smoke run on a small box
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to an output folder}"
THREADS=${THREADS:-16}
REPS=${REPS:-7}
MODEL_DIR=${MODEL_DIR:-/tmp/bitdlm_fwd}
SHAPE=${SHAPE:-2b}                 # tiny: smoke test of this script
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}  # seconds per ISA
CASES=${CASES:-decode_ctx512,sub8_ctx512,block32_ctx512_out8,block32_ctx512_out32}
mkdir -p "$OUT"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }
rc=0

log "machine"
{ lscpu; nproc; python3 --version; } > "$OUT/machine.txt" 2>&1
grep -o -w 'avx512[a-z_0-9]*\|amx[a-z_0-9]*\|avx2\|fma\|f16c' /proc/cpuinfo | sort -u | tr '\n' ' ' >> "$OUT/summary.txt"
echo >> "$OUT/summary.txt"

log "build"
if ! BUILD_DIR=build-dev scripts/dev_build.sh > "$OUT/build.log" 2>&1; then
  log "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
fi
PYTHONPATH=python python3 -c 'from bitdlm import _core; print("supported ISAs:", _core.supported_isas(), "best:", _core.active_isa())' \
  2>&1 | tee -a "$OUT/summary.txt"

log "tests/test_forward.py"
if ! python3 -c "import pytest" 2>/dev/null; then
  log "pytest is not installed here: tests NOT run (pip install pytest, or carry a wheel)"; rc=1
else
  PYTHONPATH=python timeout 240 python3 -m pytest -q -rs tests/test_forward.py > "$OUT/test_forward.log" 2>&1
  trc=$?
  tail -15 "$OUT/test_forward.log" | tee -a "$OUT/summary.txt"
  [ $trc -eq 0 ] || { log "test_forward.py FAILED (rc $trc)"; rc=1; }
fi

log "synthetic $SHAPE model (int8 lm_head) in $MODEL_DIR"
mkdir -p "$MODEL_DIR"
[ -f "$MODEL_DIR/synth_${SHAPE}_i8.bin" ] || python3 bench/make_synthetic_model.py "$MODEL_DIR/synth_${SHAPE}_i8.bin" \
  --lm-head i8 --shape "$SHAPE" > "$OUT/make_model.log" 2>&1 || { log "make_synthetic_model FAILED"; tail "$OUT/make_model.log"; exit 1; }

best=$(PYTHONPATH=python python3 -c 'from bitdlm import _core; print(_core.supported_isas()[-1])')
for isa in avx2 avx512vnni "$best"; do
  [ -f "$OUT/forward_$isa.json" ] && continue  # best may be avx512vnni
  if ! PYTHONPATH=python python3 -c "import sys; from bitdlm import _core; sys.exit('$isa' not in _core.supported_isas())"; then
    log "skip $isa (not supported here)"; continue
  fi
  log "bench/forward.py --isa $isa --threads $THREADS"
  if ! PYTHONPATH=python timeout "$BENCH_TIMEOUT" python3 bench/forward.py --isa "$isa" --threads "$THREADS" --lm-head i8 --shape "$SHAPE" \
      --reps "$REPS" --cases "$CASES" --model-dir "$MODEL_DIR" --out "$OUT/forward_$isa.json" \
      > "$OUT/forward_$isa.log" 2>&1; then
    log "forward.py $isa FAILED"; tail -20 "$OUT/forward_$isa.log"; rc=1; continue
  fi
  sed -n '/ms per phase/,$p' "$OUT/forward_$isa.log" | tee -a "$OUT/summary.txt"
done
log "done (rc $rc)"
exit $rc
