#!/usr/bin/env bash
# The ONE command of the GPU training run (docs/tiny_model.md, "GPU run"):
# run from the repo root on the device machine with $OUT set and the corpus
# from scripts/prepare_code_data.py carried in build-train/data.
#   1. nvidia-smi, torch version; build the C++ core in the background (for `bitdlm convert`)
#   2. a ~20 s sanity phase: a few steps of the real run, loss finite, tokens/s
#   3. the time-bounded run (saves the checkpoint, then evaluates on the held-out modules)
#   4. bitdlm convert -> $OUT/model.bin; checkpoint tarred in <= 15 MiB parts
# Files back in $OUT (<= 8): model.bin, ckpt.tar.part-*, train_log.json, run.log.
# CPU stand-in (tests everything but CUDA):
#   TRAIN_DEVICE=cpu TRAIN_MINUTES=0.3 OUT=/tmp/out-train bash scripts/train_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
DEVICE=${TRAIN_DEVICE:-cuda}
MINUTES=${TRAIN_MINUTES:-7.2}   # whole call: ~0.6 min sanity + budget + ~0.5 min eval/save/convert < 10 min
DATA=${TRAIN_DATA:-build-train/data}
WORK=${TRAIN_WORK:-build-train/gpu}
CKPT=$WORK/ckpt
mkdir -p "$OUT" "$WORK"
LOG=$OUT/run.log
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

# The shape and recipe (docs/tiny_model.md explains the choice).
SHAPE=(--hidden 512 --layers 8 --heads 8 --kv-heads 4 --ffn 1024 --seq-len 512 --block-size 32
       --small-block-size 8 --complementary --max-positions 2048)
if [ "$DEVICE" = cuda ]; then
  RUN=(--device cuda --amp bf16 --batch 64 --threads 4)
  SANITY_STEPS=30
else  # stand-in: same code path and model shape, one short sequence per step
  RUN=(--device cpu --amp bf16 --batch 1 --seq-len 64 --threads 2 --eval-batches 2)
  SANITY_STEPS=2
fi
RECIPE=(--lr 2e-3 --min-lr-frac 0.1 --warmup 200 --weight-decay 0.05 --steps 1000000
        --eval-every 1000 --eval-batches 16)

stamp "device"
command -v nvidia-smi >/dev/null && nvidia-smi || echo "(no nvidia-smi)"
python3 -c 'import torch, transformers, tokenizers; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "available", torch.cuda.is_available(), "| transformers", transformers.__version__, "| tokenizers", tokenizers.__version__)'
nproc
if [ ! -f "$DATA/train_tokens.npy" ]; then
  echo "FATAL: $DATA/train_tokens.npy missing (run scripts/prepare_code_data.py here and carry $DATA)"; exit 2
fi
du -sh "$DATA"

# The core, for `bitdlm convert`: reuse a working one, else build it next to the training.
BUILD_PID=
if PYTHONPATH=python python3 -c 'import bitdlm._core' 2>/dev/null; then
  stamp "bitdlm._core already importable: no build"
else
  stamp "building the core in the background ($WORK/build.log)"
  (BUILD_DIR=build-dev nice -n 10 scripts/dev_build.sh > "$WORK/build.log" 2>&1) &
  BUILD_PID=$!
fi

stamp "sanity phase"
python3 scripts/train_tiny_dlm.py --data "$DATA" "${SHAPE[@]}" "${RECIPE[@]}" "${RUN[@]}" \
  --steps "$SANITY_STEPS" --warmup 10 --eval-batches 1 --no-save --log-json "$WORK/sanity_log.json"
rc=$?
if [ $rc -ne 0 ]; then echo "FATAL: sanity phase failed (rc $rc)"; exit 3; fi

stamp "training run: budget $MINUTES min"
python3 scripts/train_tiny_dlm.py --data "$DATA" "${SHAPE[@]}" "${RECIPE[@]}" "${RUN[@]}" \
  --time-budget-min "$MINUTES" --save-every-min 2 --out "$CKPT" --log-json "$OUT/train_log.json"
train_rc=$?
stamp "training exited with rc $train_rc"
[ -f "$CKPT/model.safetensors" ] || { echo "FATAL: no checkpoint written"; exit 4; }
[ -f "$OUT/train_log.json" ] || cp "$CKPT/train_log.json" "$OUT/train_log.json"

if [ -n "$BUILD_PID" ]; then
  stamp "waiting for the core build"
  wait "$BUILD_PID"; echo "build rc $?"; tail -3 "$WORK/build.log"
fi
stamp "bitdlm convert"
PYTHONPATH=python python3 -m bitdlm.cli convert "$CKPT" "$OUT/model.bin" --force \
  && ls -l "$OUT/model.bin" || echo "ERROR: convert failed (the checkpoint still comes back)"

if [ -f "$OUT/model.bin" ] && PYTHONPATH=python python3 -c 'import bitdlm._core' 2>/dev/null; then
  stamp "sample (bitdlm on the CPU)"
  PYTHONPATH=python timeout 40 python3 -m bitdlm.cli generate 'def fibonacci(n):' --model "$OUT/model.bin" \
    --max-tokens 64 --stats || echo "(generate failed)"
fi

stamp "packing the checkpoint"
tar -C "$WORK" -cf - ckpt | split -b 15M -d - "$OUT/ckpt.tar.part-"
ls -l "$OUT"
n=$(find "$OUT" -type f | wc -l)
echo "files in OUT: $n (limit 8), total $(du -sh "$OUT" | cut -f1) (limit 64 MiB)"
echo "reassemble: cat ckpt.tar.part-* | tar -xf -"
stamp "done"
exit $train_rc
