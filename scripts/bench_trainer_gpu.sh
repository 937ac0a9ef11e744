#!/usr/bin/env bash
# Old vs new trainer on one GPU, same corpus, same shape, same batches (one
# device call, ~5 min; docs/tiny_model.md "Trainer measurements"):
#   A. scripts/train_tiny_dlm.py (reference: transformers BitNet, dense-mask SDPA)
#   B. scripts/train_dlm_gpu.py in two legs (B1 stops at half, B2 resumes from its state)
#   C. the new trainer's steady-state throughput (more steps, no evaluation)
#   D. the new trainer on a larger shape (for the shape choice)
#   P. a torch.profiler table of 10 steps of the new trainer (where a step's time goes)
#   F. the floor: the step's matrix products and attention alone at its shapes
#      (scripts/trainer_floor.py): the tokens/s no trainer of this shape can pass here
#   M. throughput per torch.compile mode and batch (default / max-autotune-no-cudagraphs /
#      reduce-overhead x batch 64 / 128; 150 steps each, no evaluation): the levers for 1M tokens/s
#      (BENCH_M_MODES / BENCH_M_BATCHES pick a subset)
# Same seed, schedule and batch: A and B see identical batches and masks, so
# their per-step losses compare directly. Logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT}"
CARRY=${TRAIN_CARRY:-build-train/carry}
WORK=${TRAIN_WORK:-$HOME/bitdlm-bench}
STEPS=${BENCH_STEPS:-120}
PARTS=${BENCH_PARTS:-A B C D}   # a shorter call: BENCH_PARTS="A B"; the profile: BENCH_PARTS="P"; modes: "M"
on() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/bench.log") 2>&1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi -L; lscpu | grep -E '^Model name|^CPU\(s\)'
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
[ -f "$WORK/data/train_tokens.npy" ] || tar -C "$WORK" -xJf "$CARRY/data.tar.xz"
du -sh "$WORK/data"
SHAPE=(--hidden 512 --layers 8 --heads 8 --kv-heads 4 --ffn 1024 --seq-len 512 --block-size 32
       --small-block-size 8 --complementary --max-positions 2048)
COMMON=(--data "$WORK/data" --device cuda --amp bf16 --batch 64 --threads 4 --lr 2e-3 --min-lr-frac 0.1
        --warmup 50 --weight-decay 0.05 --eval-every 100000 --eval-batches 8)
export PYTHONUNBUFFERED=1

if on A; then
stamp "A: old trainer, $STEPS steps"
timeout ${BENCH_TIMEOUT_OLD:-150} python3 scripts/train_tiny_dlm.py "${COMMON[@]}" "${SHAPE[@]}" --steps "$STEPS" \
  --out "$WORK/old" --log-json "$OUT/old_log.json" 2>&1 | grep -v Warning
fi
if on B; then
stamp "B1: new trainer, leg 1 ($((STEPS / 2)) steps)"
timeout 150 python3 scripts/train_dlm_gpu.py "${COMMON[@]}" "${SHAPE[@]}" --steps "$STEPS" --log-every 25 \
  --compare-every 25 --leg-steps $((STEPS / 2)) --out "$WORK/new" --state-dir "$WORK/new_state" 2>&1 | grep -v Warning
stamp "B2: new trainer, leg 2 (resume)"
timeout 120 python3 scripts/train_dlm_gpu.py "${COMMON[@]}" "${SHAPE[@]}" --steps "$STEPS" --log-every 25 \
  --compare-every 25 --resume "$WORK/new_state" --out "$WORK/new" --state-dir "$WORK/new_state" 2>&1 | grep -v Warning
cp "$WORK/new/train_log.json" "$OUT/new_log.json"
fi
if on C; then
stamp "C: new trainer throughput, 400 steps"
timeout 80 python3 scripts/train_dlm_gpu.py "${COMMON[@]}" "${SHAPE[@]}" --steps 400 --log-every 100 \
  --eval-batches 1 --out "$WORK/thr" --state-dir "$WORK/thr_state" 2>&1 | grep -v Warning | tail -12
cp "$WORK/thr/train_log.json" "$OUT/thr_log.json"
fi
if on D; then
# BENCH_D_SHAPES: extra shape flags per candidate, ';'-separated (the shape choice: tokens/s and
# early loss of each beside C's shipped shape; the last flag of a repeated option wins)
IFS=';' read -ra DSHAPES <<< "${BENCH_D_SHAPES:---layers 10 --ffn 1536}"
for i in "${!DSHAPES[@]}"; do
  stamp "D$i: larger shape (${DSHAPES[$i]}), ${BENCH_D_STEPS:-200} steps"
  timeout ${BENCH_TIMEOUT_D:-100} python3 scripts/train_dlm_gpu.py "${COMMON[@]}" "${SHAPE[@]}" ${DSHAPES[$i]} \
    --steps ${BENCH_D_STEPS:-200} --log-every 100 --eval-batches 1 --out "$WORK/big$i" --state-dir "$WORK/big${i}_state" \
    2>&1 | grep -v Warning | tail -8
  cp "$WORK/big$i/train_log.json" "$OUT/big${i}_log.json" 2>/dev/null
done
fi
if on F; then
stamp "F: the floor (matrix products + attention alone), batch 64 and 128"
for b in 64 128; do
  timeout 120 python3 scripts/trainer_floor.py "${SHAPE[@]}" --vocab 8192 --batch $b --json "$OUT/floor_$b.json" \
    2>&1 | grep -v -i warn
done
fi
if on P; then
stamp "P: profile of 10 steps of the new trainer"
timeout 150 python3 scripts/train_dlm_gpu.py "${COMMON[@]}" "${SHAPE[@]}" --steps 100 --profile 10 \
  --out "$WORK/prof" --state-dir "$WORK/prof_state" 2>&1 | grep -v Warning | tee "$OUT/profile.txt" | tail -45
fi
if on M; then
for mode in ${BENCH_M_MODES:-default max-autotune-no-cudagraphs reduce-overhead}; do
  for b in ${BENCH_M_BATCHES:-64 128}; do
    stamp "M: compile mode $mode, batch $b, 150 steps"
    timeout ${BENCH_TIMEOUT_M:-95} python3 scripts/train_dlm_gpu.py "${COMMON[@]}" "${SHAPE[@]}" --batch "$b" \
      --compile-mode "$mode" --steps 150 --log-every 50 --eval-batches 1 --out "$WORK/m_${mode}_$b" \
      --state-dir "$WORK/m_${mode}_${b}_state" 2>&1 | grep -v Warning | grep -E "compiled|tokens/s|Error|error" | tail -3
  done
done
fi
stamp "summary"
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(n):
    p = out / n
    return json.loads(p.read_text()) if p.exists() else None
old, new, thr = (load(n) for n in ("old_log.json", "new_log.json", "thr_log.json"))
bigs = [(p.stem, json.loads(p.read_text())) for p in sorted(out.glob("big*_log.json"))]
for name, lg in [("old", old), ("new", new), ("new 400 steps", thr)] + bigs:
    if lg:
        fe = lg.get("final_eval") or {}
        print(f"{name:14s} tokens/s {lg.get('tokens_per_s', 0):>12,.0f}  final held-out loss "
              f"{fe.get('loss', float('nan')):.4f} acc {fe.get('masked_acc', float('nan')):.4f}")
if old and new:
    o = dict(zip(old["steps"], old["loss"])); n = dict(zip(new["steps"], new["loss"]))
    common = sorted(set(o) & set(n))
    for s in common[::max(1, len(common) // 10)] + common[-1:]:
        print(f"step {s + 1:4d}: old {o[s]:.4f} new {n[s]:.4f}")
    import statistics
    d = [n[s] - o[s] for s in common]
    print(f"mean new-old loss over {len(d)} steps {statistics.mean(d):+.4f}, last 50 {statistics.mean(d[-50:]):+.4f}")
EOF
stamp "done"
