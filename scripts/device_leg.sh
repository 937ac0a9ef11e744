#!/usr/bin/env bash
# One device call of the default model's training (issue 26) with CPU work beside it: a trainer
# leg (scripts/train_gpu.sh) on the GPU and cores GPU_CORES (0-3), while CPU_CORES (4-15) build the
# core (which the leg's final convert waits for: CORE_READY_FILE) and then run $CPU_CMD, if set,
# with $B (a scratch folder packed into $OUT/bench.tgz) and PYTHONPATH ready. Call it again within 30 s of the last call's end
# for the next leg (the trainer's state stays on the warm machine's disk), FINAL=1 on the last.
#   OUT=$OUT STEPS=9500 LEGMIN=8.5 [FINAL=1] [CPU_CMD='...'] bash scripts/device_leg.sh
# Carry build-train/carry (data.tar.xz: scripts/device_inputs.sh data) and the wheels ($WHEELS,
# default .whl-slim: .whl without matplotlib and its deps). The shape: SHAPE (default the 12-layer,
# FFN 1920 model of docs/tiny_model.md, whose .bin fits 16 MiB with an int8 token table).
# Example CPU_CMD (issue 20's closed loop on 12 cores):
#   CPU_CMD='OUT=$B/e2e THREADS=12 LLAMA=none WHEELS=.whl-slim LIMIT=380 ARGS="--server-tpf 4 \
#     --server-threads 12 --concurrency 16,64 --server-rounds 3 --server-repeats 3 --server-profile \
#     --skip offline,llama,spin" taskset -c 4-15 bash bench/device_e2e.sh'
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT}"
B=/tmp/leg_bench
rm -rf "$B" /tmp/core_ready
mkdir -p "$B" "$OUT/train"
snap() { tar czf "$OUT/bench.tgz" -C "$B" . 2>/dev/null; }
{ date -u; nproc; lscpu; nvidia-smi -L; cat /proc/loadavg; free -g; } > "$B/machine.txt" 2>&1
GPU_CORES=${GPU_CORES:-0-3} CPU_CORES=${CPU_CORES:-4-15}
taskset -c "$GPU_CORES" env OUT="$OUT/train" TRAIN_STEPS="${STEPS:-9500}" LEG_MINUTES="${LEGMIN:-8.5}" \
  EXTRA_SHAPE="${SHAPE:---layers 12 --ffn 1920}" CONVERT_ARGS="${CONVERT:---lm-head i8 --embedding i8}" \
  CORE_READY_FILE=/tmp/core_ready ${FINAL:+FINAL_LEG=1} bash scripts/train_gpu.sh > /tmp/train.out 2>&1 &
TP=$!
WHEELS=${WHEELS:-.whl-slim}
source bench/device_wheels.sh > "$B/pip.log" 2>&1
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 B
(BITDLM_BENCH_KERNELS=1 BUILD_DIR=build-dev taskset -c "$CPU_CORES" scripts/dev_build.sh) > "$B/build.log" 2>&1
echo "build rc $? at $(date -u +%T)" >> "$B/build.log"
touch /tmp/core_ready
snap
if [ -n "${CPU_CMD:-}" ]; then
  eval "$CPU_CMD" > "$B/cpu.log" 2>&1
  echo "cpu rc $? at $(date -u +%T)" >> "$B/cpu.log"
  snap
fi
wait $TP
echo "train rc $?"
tail -30 /tmp/train.out
