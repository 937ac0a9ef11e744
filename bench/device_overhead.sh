#!/usr/bin/env bash
# bench/overhead.py on the Sapphire Rapids machine: the engine's Python cost per forward
# at 1, 16 and 64 concurrent requests on the 2B synthetic model at $THREADS threads, for
# AR, the fixed rate (2 tokens per step) with the prefix cache and with the sub-block
# cache; with the repository's git history, A/B against $BASE (default: the commit before
# the overhead work), interleaved. Results under $OUT: overhead-<mode>.json and .log.
#
#   OUT=$OUT bench/device_overhead.sh          # ~6 min
#   OUT=/tmp/o THREADS=1 BATCH=1,4 MODEL=python/bitdlm/data/tiny-bitdlm.bin bench/device_overhead.sh   # smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to an output folder}"
THREADS=${THREADS:-16}
BASE=${BASE:-a8cff17}
MODEL=${MODEL:-/tmp/bitdlm-e2e/synth2b-i8.bin}
BATCH=${BATCH:-1,16,64}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEPS="import numpy" source bench/device_setup.sh
if [ ! -f "$MODEL" ]; then
  mkdir -p "$(dirname "$MODEL")"
  python3 bench/make_synthetic_model.py "$MODEL" --lm-head i8 >/dev/null
fi
CMP=()
if git rev-parse -q --verify "$BASE^{commit}" >/dev/null 2>&1; then
  rm -rf /tmp/overhead-base && mkdir -p /tmp/overhead-base
  git archive "$BASE" python | tar -x -C /tmp/overhead-base
  ln -sf "$(realpath "$(ls python/bitdlm/_core*.so | head -1)")" /tmp/overhead-base/python/bitdlm/
  CMP=(--compare /tmp/overhead-base/python --rounds 3)
else
  echo "no git commit $BASE here: no A/B, this checkout only"
fi
for mode in ar steps dual; do
  python3 bench/overhead.py --model "$MODEL" --threads "$THREADS" --mode "$mode" --batch "$BATCH" \
    --max-tokens 32 --reps 1 "${CMP[@]}" --json "$OUT/overhead-$mode.json" 2>&1 | tee "$OUT/overhead-$mode.log"
done
