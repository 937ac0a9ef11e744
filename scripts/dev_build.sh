#!/usr/bin/env bash
# Developer build: compile bitdlm._core into build-dev/ and link it into
# python/bitdlm so that `PYTHONPATH=python pytest` uses this work tree.
# (CI and users use `pip install .` instead.)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD_DIR:-build-dev}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
so=$(ls "$BUILD"/_core*.so | head -1)
ln -sf "$(realpath "$so")" python/bitdlm/"$(basename "$so")"
echo "built $so"
