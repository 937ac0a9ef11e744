#!/usr/bin/env bash
# Build bitnet.cpp (CPU only, native ISA, TL2 kernels on) from the archive
# bench/bitnet_trim.py makes: its llama-bench and bitdlm's bench/llama_depth.cpp
# (pp / tg after a cached depth, and logits, through libllama; the fork's
# llama-bench has no depth option). One build serves I2_S, TL2 and TQ2_0 GGUFs:
# BITNET_X86_TL2 only adds the TL2 path, other types take the fork's usual one.
# gcc or clang: BitNet asks for clang; gcc 12 builds the archive (bitnet_trim.py makes the
# one edit of the generated TL2 kernels that gcc needs).
#   bench/build_bitnet_bench.sh ARCHIVE.tar.gz BUILD_DIR   -> BUILD_DIR/build/bin/{llama-bench,llama-depth}
set -euo pipefail
archive=$1; dir=$2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir"
tar xzf "$archive" -C "$dir"
cmake -S "$dir/bitnet" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBITNET_X86_TL2=ON -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=ON \
  -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=ON > "$dir/cmake.log" 2>&1 \
  || { tail -30 "$dir/cmake.log"; exit 1; }
cmake --build "$dir/build" --target llama-bench -j"$(nproc)" > "$dir/build.log" 2>&1 || { tail -40 "$dir/build.log"; exit 1; }
# the depth/logits tool links the same static libllama + ggml
src=$dir/bitnet/3rdparty/llama.cpp
"${CXX:-c++}" -O2 -std=c++11 -march=native -fopenmp -I"$src/include" -I"$src/ggml/include" -I"$dir/bitnet/include" \
  "$here/llama_depth.cpp" -o "$dir/build/bin/llama-depth" \
  "$dir/build/3rdparty/llama.cpp/src/libllama.a" "$dir/build/3rdparty/llama.cpp/ggml/src/libggml.a" -lpthread -lm \
  >> "$dir/build.log" 2>&1 || { tail -20 "$dir/build.log"; exit 1; }
ls -la "$dir/build/bin/llama-bench" "$dir/build/bin/llama-depth"
