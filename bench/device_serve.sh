#!/usr/bin/env bash
# What Ray Serve replicas of bitdlm run, measured without Ray (Ray is not on the
# 16-core Sapphire Rapids machine and too big to carry): R single-process
# `bitdlm serve` servers of T threads, pinned to disjoint cores (taskset -c), for
# R x T = 1x16, 2x8 and 4x4, under one fixed concurrent load from bench/serve.py
# (round robin over the servers, standing in for Ray's proxy), on the 2B-shaped
# synthetic model with the int8 lm_head. Throughput (tokens/s, requests/s) and
# per-request latency (p50/p90) go to JSON under $OUT; docs/scaling.md turns
# them into a fleet plan.
#
#   # the device run (one command; ~3-4 min): wheels of the server's deps in .whl/ (bench/device_setup.sh)
#   OUT=$OUT bench/device_serve.sh
#   # smoke test on a small machine
#   OUT=/tmp/out-ray CONFIGS=2x1 SHAPE=tiny N=16 C=4 MAX_TOKENS=16 bench/device_serve.sh
#
# Files under $OUT: machine.txt (lscpu -e: which CPUs are SMT siblings matters
# for the pinning), serve_RxT.json per configuration, summary.json, summary.md,
# build.log (only when the core had to be built).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/device_serve}
CONFIGS=${CONFIGS:-"1x16 2x8 4x4"}
SHAPE=${SHAPE:-2b}
N=${N:-32}                     # requests per configuration (the same for all)
C=${C:-16}                     # concurrent clients (the fixed load)
MAX_TOKENS=${MAX_TOKENS:-32}   # generated per request (ignore_eos: always all of them)
PROMPT_IDS=${PROMPT_IDS:-64}   # prompt length in tokens
TIME_LIMIT=${TIME_LIMIT:-45}   # seconds of load per configuration at most
MODEL=${MODEL:-/tmp/bitdlm-synth-$SHAPE-i8.bin}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# 1-2. the server's Python deps and the compiled core (bench/device_setup.sh)
source bench/device_setup.sh

{ echo "nproc: $(nproc)"; lscpu 2>/dev/null || true; echo; lscpu -e 2>/dev/null || true
  python3 -c "import bitdlm._core as c; print('isa:', getattr(c, 'active_isa', lambda: '?')())" \
    2>/dev/null || true; } >"$OUT/machine.txt"

# 3. the model (random ternary weights: every kernel does the real model's work)
[ -f "$MODEL" ] || python3 bench/make_synthetic_model.py "$MODEL" --shape "$SHAPE" --lm-head i8

# 4. one fixed load per configuration
for cfg in $CONFIGS; do
  r=${cfg%x*}; t=${cfg#*x}
  echo "== $r replicas x $t threads"
  # a configuration that runs out of time still reports what finished (rc 1)
  python3 bench/serve.py --model "$MODEL" --replicas "$r" --threads "$t" --pin \
    -n "$N" -c "$C" --max-tokens "$MAX_TOKENS" --prompt-ids "$PROMPT_IDS" --ignore-eos \
    --time-limit "$TIME_LIMIT" --label "${r}x${t}" --out "$OUT/serve_${r}x${t}.json" \
    >/dev/null || echo "   (some requests failed or ran out of time: see errors in the JSON)"
done

# 5. one table
python3 - "$OUT" $CONFIGS <<'EOF'
import json, os, sys

out, configs = sys.argv[1], sys.argv[2:]
rows = []
for cfg in configs:
    path = os.path.join(out, f"serve_{cfg}.json")
    if not os.path.exists(path):
        continue
    with open(path) as f:
        r = json.load(f)
    lat, ttft = r["latency_s"] or {}, r["ttft_s"] or {}
    tpf = [e["server_metrics"].get("bitdlm_tokens_per_forward") for e in r["per_endpoint"]]
    rows.append({"config": cfg, "replicas": r["replicas"], "threads": r["threads_per_replica"],
                 "concurrency": r["concurrency"], "completed": r["completed"],
                 "errors": r["errors"], "wall_s": r["wall_s"],
                 "tokens_per_s": r["tokens_per_s"], "requests_per_s": r["requests_per_s"],
                 "latency_p50_s": lat.get("p50"), "latency_p90_s": lat.get("p90"),
                 "ttft_p50_s": ttft.get("p50"), "ttft_p90_s": ttft.get("p90"),
                 "tokens_per_forward": tpf})
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(rows, f, indent=2)
fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
lines = ["| replicas x threads | done/errors | tokens/s | requests/s | latency p50 s | "
         "latency p90 s | TTFT p50 s | TTFT p90 s |", "|---|---|---|---|---|---|---|---|"]
for w in rows:
    lines.append(f"| {w['config']} | {w['completed']}/{w['errors']} | {fmt(w['tokens_per_s'], 1)} | "
                 f"{fmt(w['requests_per_s'])} | {fmt(w['latency_p50_s'])} | "
                 f"{fmt(w['latency_p90_s'])} | {fmt(w['ttft_p50_s'])} | {fmt(w['ttft_p90_s'])} |")
text = "\n".join(lines) + "\n"
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(text)
print(text)
EOF
