#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-batched-bench (CPU backend only, native ISA:
# AVX-512/AMX where the CPU has them) from the archive bench/llama_trim.py makes.
#   bench/build_llama_bench.sh ARCHIVE.tar.gz BUILD_DIR   -> BUILD_DIR/build/bin/llama-bench, llama-batched-bench
# (an archive trimmed before batched-bench was kept builds llama-bench alone)
set -euo pipefail
archive=$1; dir=$2
mkdir -p "$dir"
tar xzf "$archive" -C "$dir"
cmake -S "$dir/llama.cpp" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON > "$dir/cmake.log" 2>&1 \
  || { tail -30 "$dir/cmake.log"; exit 1; }
targets=llama-bench
[ -d "$dir/llama.cpp/tools/batched-bench" ] && targets="$targets llama-batched-bench"
cmake --build "$dir/build" --target $targets -j"$(nproc)" > "$dir/build.log" 2>&1 || { tail -40 "$dir/build.log"; exit 1; }
ls -la "$dir"/build/bin/llama-*bench
