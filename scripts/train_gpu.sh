#!/usr/bin/env bash
# ONE LEG of the default model's GPU training (docs/tiny_model.md, "The next run").
# Run from the repo root on the device machine with $OUT set. A training of
# TRAIN_STEPS steps spans several legs (device calls of <= 10 min), each
# called within 30 s of the last so the machine (and its disk) stays warm:
#   leg 1: unpacks the corpus, trains from scratch for LEG_MINUTES
#   leg k: resumes from $WORK/state/state.pt (full state, kept on the machine's disk)
#   last:  reaches TRAIN_STEPS, evaluates, converts -> $OUT/model.bin, samples
# The state lives outside the carried folders ($WORK, default ~/bitdlm-train):
# a carried folder is replaced on every call, the machine's disk is not.
# Every leg returns the portable checkpoint (bf16 weights + trainer_state.json,
# tar in <= 15 MiB parts), train_log.json and run.log; where the parts would pass 62 MiB
# (a larger shape), the leg's weights as model_leg.bin instead (INIT_BIN's fallback start). If the machine is lost,
# put the parts that came back in build-train/carry/resume/ and call again:
# the leg resumes from those weights (fresh AdamW moments, short re-warmup).
# Carried inputs (ignored folder build-train/carry, <= 64 MiB with the tree):
#   data.tar.xz (scripts/prepare_code_data.py --pack), optional resume/ckpt.tar.part-*
# The corpus and checkpoint do not fit one call together: after a lost machine
# first call with DATA_ONLY=1 (unpacks the corpus to $WORK and exits), then,
# within 30 s and without data.tar.xz in the carry, the resuming leg.
# Options (environment): INIT_BIN=FILE.bin starts leg 1 from a .bin's weights (same shape and
# tokenizer: the shipped model, with the corpus it was trained on) with a new schedule;
# TRAIN_LR the peak learning rate (2e-3); EXTRA_SHAPE more shape flags (a larger model: its .bin
# fits 16 MiB with CONVERT_ARGS="--lm-head i8 --embedding i8", docs/tiny_model.md); FINAL_LEG=1
# ends the schedule where this leg's time is up (evaluate, convert, sample) when TRAIN_STEPS is not
# reached by then.
# CPU stand-in (everything but CUDA; tiny run):
#   TRAIN_DEVICE=cpu TRAIN_STEPS=4 OUT=/tmp/out-train bash scripts/train_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
DEVICE=${TRAIN_DEVICE:-cuda}
STEPS=${TRAIN_STEPS:-40000}          # the whole schedule (cosine); set from the measured steps/s
LEG_MINUTES=${LEG_MINUTES:-8.3}      # training time of this leg (the call: + ~1 min start/save)
CARRY=${TRAIN_CARRY:-build-train/carry}
WORK=${TRAIN_WORK:-$HOME/bitdlm-train}
DATA=$WORK/data
CKPT=$WORK/ckpt
mkdir -p "$OUT" "$WORK"
LOG=$OUT/run.log
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

# The shape and recipe (docs/tiny_model.md explains the choice).
SHAPE=(--hidden 512 --layers 8 --heads 8 --kv-heads 4 --ffn 1024 --seq-len 512 --block-size 32
       --small-block-size 8 --complementary --max-positions 2048)
RECIPE=(--lr "${TRAIN_LR:-2e-3}" --min-lr-frac 0.1 --warmup 300 --weight-decay 0.05 --steps "$STEPS"
        --eval-every 2000 --eval-batches 16 --save-every-min 3)
if [ "$DEVICE" = cuda ]; then
  RUN=(--device cuda --amp bf16 --batch 64 --threads 4)
else  # stand-in: same code path, one short sequence per step
  RUN=(--device cpu --amp bf16 --batch 1 --seq-len 64 --threads 2 --eval-batches 2 --eval-every 2)
fi
SHAPE+=(${EXTRA_SHAPE:-})

stamp "device"
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "(no nvidia-smi)"
python3 -c 'import torch, transformers, tokenizers; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "available", torch.cuda.is_available(), "| transformers", transformers.__version__, "| tokenizers", tokenizers.__version__)'

if [ ! -f "$DATA/train_tokens.npy" ]; then
  [ -f "$CARRY/data.tar.xz" ] || { echo "FATAL: no corpus: $DATA empty and $CARRY/data.tar.xz not carried"; exit 2; }
  stamp "unpacking $CARRY/data.tar.xz -> $DATA"
  tar -C "$WORK" -xJf "$CARRY/data.tar.xz" || { echo "FATAL: unpack failed"; exit 2; }
fi
du -sh "$DATA"
if [ -n "${DATA_ONLY:-}" ]; then stamp "DATA_ONLY: corpus in place"; exit 0; fi

# The core, for `bitdlm convert` at the end: build it in the background once.
# CORE_READY_FILE=PATH: another job of the same call builds it and touches PATH when done
# (e.g. a bench build whose native tests run beside the training); convert waits for PATH.
BUILD_PID=
if [ -n "${CORE_READY_FILE:-}" ]; then
  stamp "the core is built beside this leg (waiting for $CORE_READY_FILE before convert)"
elif ! PYTHONPATH=python python3 -c 'import bitdlm._core' 2>/dev/null; then
  stamp "building the core in the background ($WORK/build.log)"
  (BUILD_DIR=build-dev nice -n 10 scripts/dev_build.sh > "$WORK/build.log" 2>&1) &
  BUILD_PID=$!
fi

RESUME=()
if [ -n "${FINAL_LEG:-}" ]; then RESUME+=(--final-leg); fi  # ends the schedule where this leg's time is up
if [ -f "$WORK/state/state.pt" ]; then
  RESUME+=(--resume "$WORK/state")
elif ls "$CARRY"/resume/ckpt.tar.part-* >/dev/null 2>&1; then
  stamp "machine was lost: resuming from the carried portable checkpoint"
  rm -rf "$CKPT" && cat "$CARRY"/resume/ckpt.tar.part-* | tar -C "$WORK" -xf - || exit 3
  RESUME+=(--resume "$CKPT")
elif [ -n "${INIT_BIN:-}" ]; then  # a new schedule from a .bin's weights (the shipped model, say)
  RESUME+=(--init-bin "$INIT_BIN")
fi
stamp "training leg: ${RESUME[*]:-from scratch}, $LEG_MINUTES min, schedule $STEPS steps"
PYTHONUNBUFFERED=1 python3 scripts/train_dlm_gpu.py --data "$DATA" "${SHAPE[@]}" "${RECIPE[@]}" "${RUN[@]}" \
  "${RESUME[@]}" --leg-minutes "$LEG_MINUTES" --out "$CKPT" --state-dir "$WORK/state"
train_rc=$?
stamp "training exited with rc $train_rc"
[ -f "$CKPT/train_log.json" ] && cp "$CKPT/train_log.json" "$OUT/train_log.json"

# convert_ckpt FILE: the checkpoint's weights -> FILE (CONVERT_ARGS), once the core is built
convert_ckpt() {
  if [ -n "$BUILD_PID" ]; then
    stamp "waiting for the core build"; wait "$BUILD_PID"; tail -2 "$WORK/build.log"; BUILD_PID=
  fi
  if [ -n "${CORE_READY_FILE:-}" ]; then
    stamp "waiting for $CORE_READY_FILE"
    for _ in $(seq 300); do [ -f "$CORE_READY_FILE" ] && break; sleep 1; done
  fi
  stamp "bitdlm convert -> $1"
  PYTHONPATH=python python3 -m bitdlm.cli convert "$CKPT" "$1" --force ${CONVERT_ARGS:-} && ls -l "$1"
}

if [ "$train_rc" -eq 0 ] && [ -f "$CKPT/DONE" ]; then  # (a failed leg never converts an older run's DONE)
  convert_ckpt "$OUT/model.bin" || echo "ERROR: convert failed (the checkpoint still comes back)"
  if [ -f "$OUT/model.bin" ]; then
    PYTHONPATH=python timeout 60 python3 -m bitdlm.cli generate 'def fibonacci(n):' --model "$OUT/model.bin" \
      --max-tokens 64 --stats || echo "(generate failed)"
  fi
else
  echo "NOT DONE: call this script again (within 30 s) for the next leg"
fi

stamp "packing the portable checkpoint"
tar -C "$WORK" -cf - --exclude ckpt/state --exclude ckpt/DONE ckpt | split -b 15M -d - "$OUT/ckpt.tar.part-"
total=$(du -cb "$OUT"/* | tail -1 | cut -f1)
if [ "$total" -gt $((${RETURN_MIB:-62} * 1048576)) ]; then  # keep the .bin and logs; the checkpoint stays on the machine
  echo "WARNING: $total bytes > ${RETURN_MIB:-62} MiB: the checkpoint parts are not returned"; rm -f "$OUT"/ckpt.tar.part-*
  if [ ! -f "$OUT/model.bin" ] && [ "$train_rc" -eq 0 ]; then
    # (a larger shape: bf16 weights over 62 MiB) what a lost machine leaves instead: this leg's
    # weights as a .bin, the start of a new schedule (INIT_BIN=model_leg.bin, same EXTRA_SHAPE)
    convert_ckpt "$OUT/model_leg.bin" || echo "(convert of the leg failed)"
  fi
fi
ls -l "$OUT"
echo "files in OUT: $(find "$OUT" -type f | wc -l) (limit 8); reassemble: cat ckpt.tar.part-* | tar -xf -"
stamp "done"
exit $train_rc
