#!/usr/bin/env bash
# One command for the Sapphire Rapids machine (or any x86-64 Linux box), ~7
# minutes on 16 cores: build the core with the bench-only kernels
# (BITDLM_BENCH_KERNELS=1: machine ceilings, AMX variants), the kernel and
# cross-ISA forward tests natively on every ISA this CPU has (AMX included
# when present), then the benchmarks: bench/kernels.py (ceilings, per-ISA
# GEMMs, the 30-layer decode pass vs the read bandwidth, lm_head),
# bench/amx_sweep.py --quick (AMX variants and the wide-token VNNI bench
# kernels in the 30-layer pass at N = 8 / 32, int8 lm_head per ISA, AMX
# per-call costs) and bench/forward.py on the 2B-shaped synthetic model
# (int8 lm_head; amx at FWD_THREADS, avx512vnni = the Zen 4 path at 8 and 16).
# With LLAMA_ARCHIVE (bench/llama_trim.py's llama-cpu.tar.gz) it then runs
# bench/native_compare.py: bitdlm beside llama-bench at 1, 8 and 16 threads
# and per ISA at 16 (issue 19's llama.cpp ratios, break-even tokens per
# forward, 8-thread targets, 1 -> 16 thread efficiency), ~4 more minutes;
# with BITNET_ARCHIVE too (bench/bitnet_trim.py's bitnet-cpu.tar.gz) bitnet.cpp's
# I2_S and TL2 pp32 / tg on the same weights join it, ~3 more minutes.
# Everything lands in $OUT (at most 8 files): kernels.log (all output),
# tests.log, kernels.json, amx_sweep.json, forward_amx.json,
# forward_avx512vnni.json, native_compare.json / .png.
#   OUT=/tmp/out-kernels [WHEELS=.whl] [LLAMA_ARCHIVE=bench/out/llama-cpu.tar.gz]
#     [BITNET_ARCHIVE=bench/out/bitnet-cpu.tar.gz] bench/device_kernels.sh
# Needs: python3 with numpy, pybind11, cmake, ninja, pytest, torch and
# transformers (the forward tests compare with them). No network. Wheels in
# $WHEELS (default .whl/: pybind11, pytest, ...) are installed first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out-kernels}
FWD_THREADS=${FWD_THREADS:-8,16}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
exec > >(tee "$OUT/kernels.log") 2>&1
export PYTHONPATH=python PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "machine"
lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core|L3" || true
grep -o -w -E "avx512f|avx512_vnni|amx_tile|amx_int8" /proc/cpuinfo | sort | uniq -c || true
source bench/device_wheels.sh

step "build (BITDLM_BENCH_KERNELS=1)"
BITDLM_BENCH_KERNELS=1 BUILD_DIR=build-dev scripts/dev_build.sh > /tmp/bitdlm_build.log 2>&1 \
  || { tail -40 /tmp/bitdlm_build.log; echo "BUILD FAILED"; exit 1; }
python3 -c "from bitdlm import _core; print('supported ISAs:', _core.supported_isas(), 'picked:', _core.active_isa(),
      'bench kernels:', _core.build_info()['bench_kernels'])"

step "host probe: OpenMP fork / barrier costs (PROBE_MAX_US, default 40: an unfit host stops the timings)"
max_us=${PROBE_MAX_US-40}  # (its table goes to kernels.log: $OUT holds at most 8 files)
python3 bench/host_probe.py ${max_us:+--max-fork-us "$max_us"}
probe=$?
if [ $probe -eq 3 ]; then echo "UNFIT HOST: no timings (set PROBE_MAX_US= to time anyway)"; exit 3; fi
[ $probe -eq 0 ] || status=1

if [ -z "${SKIP_TESTS:-}" ]; then  # SKIP_TESTS=1: when an earlier call on this host ran them
  step "tests: kernels (every ISA through the isa fixture, AMX + its bench variants) + logits across ISAs"
  timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_isa_forward.py \
    > "$OUT/tests.log" 2>&1 || status=1
  tail -8 "$OUT/tests.log"
fi

step "bench/kernels.py: ceilings, GEMMs per ISA, 30-layer decode pass, lm_head (16 threads)"
isas=$(python3 -c "from bitdlm import _core; print(','.join(i for i in ('amx', 'avx512vnni', 'avx2') if i in _core.supported_isas()))")
timeout 150 python3 bench/kernels.py --isas "$isas" --threads "$(nproc)" --json "$OUT/kernels.json" || status=1

step "bench/kernels.py --smallops-only (the small-op row drivers alone: fork / join vs cross-core vs arithmetic)"
timeout 30 python3 bench/kernels.py --smallops-only --threads "1,8,$(nproc)" --json "$OUT/smallops.json" || status=1

step "bench/amx_sweep.py --quick (AMX variants + wide VNNI tiles in the 30-layer pass, int8 lm_head, AMX call costs)"
timeout 90 python3 bench/amx_sweep.py --quick --threads "$(nproc)" --json "$OUT/amx_sweep.json" || status=1

step "bench/forward.py (2B synthetic, int8 lm_head, 512 / 2048 cached)"
for isa in amx avx512vnni; do
  python3 -c "import sys; from bitdlm import _core; sys.exit('$isa' not in _core.supported_isas())" || continue
  thr=$FWD_THREADS; cases=decode_ctx512,sub8_ctx512,block32_ctx512_out8,block32_ctx2048_out8
  [ "$isa" = avx512vnni ] && thr=8,16 && cases=decode_ctx512,sub8_ctx512,block32_ctx512_out8
  tmo=130; [ "$isa" = avx512vnni ] && tmo=110
  timeout $tmo python3 bench/forward.py --isa "$isa" --threads "$thr" --lm-head i8 --reps 5 --cases "$cases" \
    --model-dir /tmp/bitdlm_fwd --out "$OUT/forward_$isa.json" > /tmp/forward_$isa.log 2>&1 || status=1
  grep "threads=" /tmp/forward_$isa.log
  sed -n '/ms per phase/,$p' /tmp/forward_$isa.log
done

# The 2 x 8 VNNI tiles against AMX at 8 / 16 tokens inside the forward: the sub-block and
# block steps with AMX only from 17 tokens (the shipped threshold is kAmxMinTokens).
if python3 -c "import sys; from bitdlm import _core; sys.exit('amx' not in _core.supported_isas())"; then
  step "bench/forward.py amx with BITDLM_AMX_MIN_TOKENS=17 (8-token GEMMs on VNNI)"
  BITDLM_AMX_MIN_TOKENS=17 timeout 60 python3 bench/forward.py --isa amx --threads "$(nproc)" --lm-head i8 --reps 5 \
    --cases sub8_ctx512,block32_ctx512_out8 --model-dir /tmp/bitdlm_fwd > /tmp/forward_amx17.log 2>&1 || status=1
  grep "threads=" /tmp/forward_amx17.log; sed -n '/ms per phase/,$p' /tmp/forward_amx17.log
fi

if [ -n "${LLAMA_ARCHIVE:-}" ]; then
  step "bench/native_compare.py (bitdlm beside llama-bench${BITNET_ARCHIVE:+ and bitnet.cpp}, 512 cached)"
  tmo=330; [ -n "${BITNET_ARCHIVE:-}" ] && tmo=520
  timeout $tmo python3 bench/native_compare.py --llama-archive "$LLAMA_ARCHIVE" --bitnet-archive "${BITNET_ARCHIVE:-}" \
    --threads 1,8,"$(nproc)" \
    --isas "$isas" --reps 3 --ctx 512 --kernels-json "$OUT/kernels.json" \
    --json "$OUT/native_compare.json" --plot "$OUT/native_compare.png" || status=1
fi

step "done (status $status)"
exit $status
