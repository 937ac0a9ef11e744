#!/usr/bin/env bash
# A/B of this tree against an older one on the device machine, in one call (~4-6 min on 16
# cores): builds both cores, probes the host (bench/host_probe.py: an unfit host stops here),
# then at each thread count of AB_THREADS (default "16 8") runs, each build loaded side by side in
# one process and called in alternating order:
#   bench/forward_ab.py  decode / 8-token / 32-token steps and a 512-token causal prompt of the 2B
#                        synthetic model (int8 lm_head)
#   bench/gemm_ab.py     the 30 layers' ternary GEMMs from DRAM, N = 1 and 8
#   bench/attn_ab.py     attention alone (1 / 8 / 32 queries x 512 cached)
# for every ISA of AB_ISAS present (default "amx avx512vnni"; forward_ab and gemm_ab per ISA),
# then bench/forward.py's phase table of this tree per ISA at the first thread count.
# The base tree travels as a tar of its sources (the device gets no git history):
#   git archive -o build-train/carry/base_src.tar 29680d6 CMakeLists.txt pyproject.toml csrc scripts/dev_build.sh
#   OUT=$OUT BASE_SRC=build-train/carry/base_src.tar WHEELS=.whl-slim bash bench/device_ab.sh
# (carry build-train/carry and .whl-slim). Results: $OUT/ab.log, probe.json, forward_<isa>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT}" "${BASE_SRC:?set BASE_SRC to a tar of the base sources}"
THREADS=${AB_THREADS:-16 8}
ISAS=${AB_ISAS:-amx avx512vnni}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
exec > >(tee "$OUT/ab.log") 2>&1
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
export PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1

step "machine"
lscpu | grep -E "Model name|^CPU\(s\)|L3" || true
source bench/device_wheels.sh
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}

step "build this tree (bench kernels) and the base"
BITDLM_BENCH_KERNELS=1 BUILD_DIR=build-dev scripts/dev_build.sh > /tmp/ab_build.log 2>&1 \
  || { tail -30 /tmp/ab_build.log; echo "BUILD FAILED"; exit 1; }
rm -rf /tmp/ab_base && mkdir -p /tmp/ab_base && tar -xf "$BASE_SRC" -C /tmp/ab_base \
  && (cd /tmp/ab_base && mkdir -p python/bitdlm && BUILD_DIR=build-dev scripts/dev_build.sh) > /tmp/ab_base.log 2>&1 \
  || { tail -30 /tmp/ab_base.log; echo "BASE BUILD FAILED"; exit 1; }
NEW=$(ls build-dev/_core*.so | head -1)
BASE=$(ls /tmp/ab_base/build-dev/_core*.so | head -1)
echo "base $BASE"; echo "new  $NEW"

step "host probe (PROBE_MAX_US, default 40)"
max_us=${PROBE_MAX_US-40}
python3 bench/host_probe.py ${max_us:+--max-fork-us "$max_us"} --json "$OUT/probe.json"
[ $? -eq 3 ] && { echo "UNFIT HOST: no timings (PROBE_MAX_US= to time anyway)"; exit 3; }

supported=$(python3 -c "from bitdlm import _core; print(' '.join(_core.supported_isas()))")
[ -f /tmp/bitdlm_fwd/synth_2b_i8.bin ] || { mkdir -p /tmp/bitdlm_fwd \
  && python3 bench/make_synthetic_model.py /tmp/bitdlm_fwd/synth_2b_i8.bin --lm-head i8 > /dev/null; }
for t in $THREADS; do
  for isa in $ISAS; do
    case " $supported " in *" $isa "*) ;; *) continue ;; esac
    step "forward_ab $isa $t threads"
    timeout 300 python3 bench/forward_ab.py "$BASE" "$NEW" --threads "$t" --isa "$isa" --reps 9 \
      --cases decode_ctx512,sub8_ctx512,block32_ctx512_out8,prefill512_b1
    for n in 1 8; do
      step "gemm_ab $isa N=$n $t threads"
      timeout 120 python3 bench/gemm_ab.py "$BASE" "$NEW" --threads "$t" --isa "$isa" --n "$n" --reps 9
    done
  done
  step "attn_ab avx512 $t threads"
  timeout 120 python3 bench/attn_ab.py "$BASE" "$NEW" --threads "$t" --reps 9 --isa avx512 --cases 1x512,8x512,32x512
done
step "bench/forward.py: this tree's phases per ISA at the most threads"
t=${THREADS%% *}
for isa in $ISAS; do
  case " $supported " in *" $isa "*) ;; *) continue ;; esac
  timeout 150 python3 bench/forward.py --isa "$isa" --threads "$t" --lm-head i8 --reps 5 --model-dir /tmp/bitdlm_fwd \
    --cases decode_ctx512,sub8_ctx512,block32_ctx512_out8 --out "$OUT/forward_$isa.json" 2>&1 | sed -n '/ms per phase/,$p'
done
step "done"
