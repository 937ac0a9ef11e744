#!/usr/bin/env bash
# Developer build: compile bitdlm._core into build-dev/ and link it into
# python/bitdlm so that `PYTHONPATH=python pytest` uses this work tree.
# (CI and users use `pip install .` instead.) BITDLM_BENCH_KERNELS=1 adds the
# bench-only kernels (csrc/bench/: machine ceilings, AMX variants) that
# bench/kernels.py and bench/amx_sweep.py need.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD_DIR:-build-dev}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python3)" \
  -DBITDLM_BENCH_KERNELS="$([ "${BITDLM_BENCH_KERNELS:-0}" = 1 ] && echo ON || echo OFF)" >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
so=$(ls "$BUILD"/_core*.so | head -1)
ln -sf "$(realpath "$so")" python/bitdlm/"$(basename "$so")"
echo "built $so"
