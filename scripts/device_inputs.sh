#!/usr/bin/env bash
# Re-make the git-ignored inputs that the device calls carry (a fresh checkout has none of them;
# the device machine has no network). Each part is skipped when its output exists.
#   .whl/                          Python 3.12 wheels for the device (bench/device_setup.sh,
#                                  bench/device_kernels.sh): the server's deps, gguf, tqdm, pyyaml,
#                                  and pybind11 / pytest / matplotlib for the builds, tests and plots
#   bench/out/llama-cpu.tar.gz     llama.cpp trimmed to llama-bench + llama-batched-bench
#                                  (bench/llama_trim.py; the llama-cpp-python 0.3.36 sdist from PyPI)
#   bench/out/bitnet-cpu.tar.gz    bitnet.cpp (bench/bitnet_trim.py): needs git clones of
#                                  microsoft/BitNet and Eddie-Wang1120/llama.cpp in $BITNET_GIT and
#                                  $LLAMA_GIT (the commits it names; e.g. from the search tool's fetch)
#   build-train/carry/data.tar.xz  the training corpus (scripts/prepare_code_data.py --pack; ~10 min
#                                  on 2 cores; its manifest must equal docs/tiny_model_corpus.json)
#   .whl-slim/                     .whl without matplotlib and its dependencies (the device calls
#                                  that make no plots: more of the 64 MiB left for the corpus)
#   build-train/carry/base_src.tar the sources of BASE (default 29680d6, the session-13 tree) for
#                                  bench/device_ab.sh's A/B (`git archive`)
#     scripts/device_inputs.sh [wheels] [slim] [llama] [bitnet] [data] [base]   # default: all six
# Keep .whl/ out of the working tree that travels to the device: `echo /.whl/ >> .git/info/exclude`
# (it is carried explicitly, `carry: [".whl", "bench/out"]`).
set -euo pipefail
cd "$(dirname "$0")/.."
parts=${*:-wheels slim llama bitnet data base}
py=python3
for part in $parts; do
  case $part in
  wheels)
    if compgen -G ".whl/pydantic_core-*cp312*.whl" >/dev/null; then echo ".whl: present"; continue; fi
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    $py -m pip download -q -d .whl --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
      fastapi uvicorn pydantic prometheus-client httpx pyyaml tqdm pybind11 pytest matplotlib
    # gguf's numpy requirement would pull a numpy that shadows the device's own (torch's)
    $py -m pip download -q -d .whl --no-deps gguf
    rm -f .whl/numpy-*.whl .whl/pillow-*.whl
    echo ".whl: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1)" ;;
  slim)
    if compgen -G ".whl-slim/*.whl" >/dev/null; then echo ".whl-slim: present"; continue; fi
    grep -qx '/.whl-slim/' .git/info/exclude 2>/dev/null || echo /.whl-slim/ >> .git/info/exclude
    mkdir -p .whl-slim
    for w in .whl/*.whl; do
      case $(basename "$w") in
        matplotlib-*|contourpy-*|cycler-*|fonttools-*|kiwisolver-*|pyparsing-*|python_dateutil-*|tzdata-*|six-*) ;;
        *) cp "$w" .whl-slim/ ;;
      esac
    done
    echo ".whl-slim: $(ls .whl-slim | wc -l) wheels, $(du -sh .whl-slim | cut -f1)" ;;
  base)
    out=build-train/carry/base_src.tar
    mkdir -p build-train/carry
    git archive -o "$out" "${BASE:-29680d6}" CMakeLists.txt pyproject.toml csrc scripts/dev_build.sh \
      && echo "$out: sources of ${BASE:-29680d6} ($(du -h "$out" | cut -f1))" ;;
  llama)
    out=bench/out/llama-cpu.tar.gz
    if [ -f "$out" ]; then echo "$out: present"; continue; fi
    mkdir -p bench/out /tmp/llama-sdist
    # --no-build-isolation: pip reads the sdist's metadata with the installed scikit-build-core
    # instead of building its build requirements (CMake) from source under --no-binary :all:
    sdist=$(ls /tmp/llama-sdist/llama_cpp_python-0.3.36.tar.gz 2>/dev/null || true)
    if [ -z "$sdist" ]; then
      $py -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d /tmp/llama-sdist \
        llama-cpp-python==0.3.36
      sdist=/tmp/llama-sdist/llama_cpp_python-0.3.36.tar.gz
    fi
    $py bench/llama_trim.py "$sdist" "$out" && ls -l "$out" ;;
  bitnet)
    out=bench/out/bitnet-cpu.tar.gz
    if [ -f "$out" ]; then echo "$out: present"; continue; fi
    if [ -z "${BITNET_GIT:-}" ] || [ -z "${LLAMA_GIT:-}" ]; then
      echo "$out: skipped (set BITNET_GIT and LLAMA_GIT to clones of microsoft/BitNet and Eddie-Wang1120/llama.cpp)"
      continue
    fi
    mkdir -p bench/out
    $py bench/bitnet_trim.py --bitnet-git "$BITNET_GIT" --llama-git "$LLAMA_GIT" "$out" && ls -l "$out" ;;
  data)
    out=build-train/carry/data.tar.xz
    if [ -f "$out" ]; then echo "$out: present"; continue; fi
    mkdir -p build-train/carry
    $py scripts/prepare_code_data.py --packages --out build-train/data --manifest /tmp/corpus_manifest.json \
      --pack "$out"
    if cmp -s /tmp/corpus_manifest.json docs/tiny_model_corpus.json; then
      echo "$out: the corpus of docs/tiny_model_corpus.json"
    else
      echo "WARNING: the manifest differs from docs/tiny_model_corpus.json (other package versions installed):"
      echo "  the corpus and its tokenizer are not the shipped model's (--init-bin refuses another tokenizer)"
    fi ;;
  *) echo "unknown part: $part (wheels, slim, llama, bitnet, data, base)"; exit 2 ;;
  esac
done
