# Sourced by the device scripts (bench/device_serve.sh, bench/device_e2e.sh), from the
# repository root with $OUT set: puts the server's Python deps on PYTHONPATH (from the
# wheels carried in .whl/ when the machine lacks them) and builds bitdlm._core for this
# CPU unless one imports already (log: $OUT/build.log). $DEPS: the import line to satisfy.
# The wheels, fetched where there is network (Python 3.12 on the device):
#   pip download -d .whl --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     fastapi uvicorn pydantic prometheus-client httpx pyyaml tqdm && pip download -d .whl --no-deps gguf
# 1. the server's Python deps, from the carried wheels ($WHEELS, default .whl/) when the machine lacks them
deps=${DEPS:-"import fastapi, uvicorn, pydantic, prometheus_client, httpx"}
python3 -c "$deps" 2>/dev/null || source bench/device_wheels.sh
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
python3 -c "$deps" \
  || { echo "missing server dependencies: carry their wheels in .whl/ (docs/scaling.md)"; exit 1; }

# 2. the compiled core for this machine, unless one imports already
if ! python3 -c "import bitdlm._core" 2>/dev/null; then
  BUILD=build-device
  echo "building the core in $BUILD"
  { cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
      -DPython_EXECUTABLE="$(command -v python3)" \
    && cmake --build "$BUILD" -j"$(nproc)"; } >"$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
  ln -sf "$(realpath "$(ls "$BUILD"/_core*.so | head -1)")" python/bitdlm/
fi

