#!/usr/bin/env bash
# bench/e2e.py on the users' kind of machine (Sapphire Rapids, 16 cores), one command:
# the server's deps and the core (bench/device_setup.sh), llama.cpp's llama-bench and
# llama-batched-bench from the trimmed source (bench/llama_trim.py; built while the 2B
# synthetic model is made, before anything is timed), then the end-to-end figures at
# 8 and 16 threads. Results under $OUT: e2e.json, e2e.png, e2e.log, machine.txt, build.log.
#
#   OUT=$OUT bench/device_e2e.sh      # carry bench/out/llama-cpu.tar.gz and .whl/ (bench/device_setup.sh)
#   OUT=/tmp/o THREADS=1 ARGS=--tiny bench/device_e2e.sh   # smoke run on a small box
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to an output folder}"
THREADS=${THREADS:-8,16}
LLAMA=${LLAMA:-bench/out/llama-cpu.tar.gz}
LIMIT=${LIMIT:-420}   # seconds for bench/e2e.py; what finished by then is in e2e.json
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEPS="import fastapi, uvicorn, pydantic, prometheus_client, httpx, gguf" source bench/device_setup.sh
{ nproc; lscpu 2>/dev/null || true; cat /proc/loadavg; } >"$OUT/machine.txt"
[ -f "$LLAMA" ] || { echo "no $LLAMA: llama.cpp is skipped"; LLAMA=""; }
timeout "$LIMIT" python3 bench/e2e.py --threads "$THREADS" --llama-archive "$LLAMA" \
  --workdir /tmp/bitdlm-e2e --json "$OUT/e2e.json" --plot "$OUT/e2e.png" ${ARGS:-} 2>&1 | tee "$OUT/e2e.log"
