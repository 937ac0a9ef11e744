#!/usr/bin/env bash
# `pip install .` on aarch64 under user-mode emulation, on an x86-64 Debian /
# Ubuntu host (root), then `bitdlm generate` on the packaged model,
# tests/test_kernels.py and the forward checks (tests/arm/forward_check.py),
# at 1 and 2 OpenMP threads.
#
#   scripts/arm_emulated_install.sh [WORKDIR]     (default: build/arm-emu, git-ignored)
#
# Everything aarch64 runs as aarch64 code: a Debian bookworm arm64 system
# (debootstrap: python3.11, g++ 12, CMake, Ninja from Debian's arm64 packages)
# is entered with proot, which runs each aarch64 program through qemu-aarch64,
# including the ones pip, CMake and g++ start. That replaces binfmt_misc
# (registering qemu with the kernel needs a privileged host; a plain
# `qemu-aarch64 -L SYSROOT` runs one program but its children's exec fails).
# Python wheels come from PyPI's aarch64 builds (pip download --platform);
# the build requirements too: the install itself runs offline.
# Each step prints its wall time and appends it to WORKDIR/timings.txt; a step
# already done (its marker file exists) is skipped. Measured runs: docs/kernels.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=$(realpath -m "${1:-build/arm-emu}")
SR=$W/sysroot
MIRROR=${MIRROR:-http://deb.debian.org/debian}
mkdir -p "$W/wheels" "$W/cases"
[ "$(uname -m)" = x86_64 ] || { echo "run this on an x86-64 host" >&2; exit 2; }

step() {  # step NAME COMMAND...: run and time it unless $W/NAME.done exists
  local name=$1; shift
  if [ -e "$W/$name.done" ]; then echo "== $name: done before, skipped"; return; fi
  echo "== $name"
  local t0=$SECONDS
  "$@"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$W/timings.txt"
  touch "$W/$name.done"
}

# a command inside the aarch64 system, with a clean environment (no host PIP_* settings)
guest() {
  env -i PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python3 "$ROOT/scripts/enosys_exec.py" \
    proot -q qemu-aarch64 -r "$SR" -b /dev -b /proc -b /sys \
    -b "$ROOT:/src" -b "$W/wheels:/wheels" -b "$W/cases:/cases" -w /src "$@"
}

host_tools() {
  local pkgs=()
  command -v qemu-aarch64 >/dev/null || pkgs+=(qemu-user)
  command -v proot >/dev/null || pkgs+=(proot)
  command -v debootstrap >/dev/null || pkgs+=(debootstrap)
  if [ ${#pkgs[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
  fi
}

sysroot_download() {  # unpacks the base system, downloads the rest
  debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=python3,python3-dev,python3-venv,g++,cmake,ninja-build bookworm "$SR" "$MIRROR" >"$W/debootstrap.log"
  # the first stage leaves /proc as a link to the host's, which proot cannot bind over
  rm -f "$SR/proc" && mkdir -p "$SR/proc"
}

sysroot_configure() {  # dpkg and the maintainer scripts, emulated
  DEBOOTSTRAP_DIR=/debootstrap guest /debootstrap/debootstrap --second-stage >"$W/second-stage.log" 2>&1 ||
    { tail -20 "$W/second-stage.log"; return 1; }
}

wheels() {  # PyPI's aarch64 wheels of the dependencies, the build requirements and pytest
  python3 -m pip download -q -d "$W/wheels" --only-binary :all: --python-version 3.11 --implementation cp \
    --abi cp311 --abi abi3 --abi none --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux_2_28_aarch64 "scikit-build-core>=0.10" "pybind11>=2.12" pytest \
    "numpy>=1.24" "safetensors>=0.4" "tokenizers>=0.19" "tqdm>=4.60" "jinja2>=3.1" "fastapi>=0.110" \
    "uvicorn>=0.29" "pydantic>=2" "prometheus-client>=0.17"
}

venv() {
  guest /usr/bin/python3 -m venv /opt/venv
  guest pip install -q --no-index --find-links /wheels numpy safetensors tokenizers tqdm jinja2 fastapi \
    uvicorn pydantic prometheus-client pytest
}

pip_install() {  # README's command, with build isolation (scikit-build-core + pybind11 from /wheels)
  guest pip install --no-index --find-links /wheels . >"$W/pip-install.log" 2>&1 ||
    { tail -30 "$W/pip-install.log"; return 1; }
  tail -1 "$W/pip-install.log"
}

run_generate() {
  guest bitdlm --version
  for t in 1 2; do
    echo "-- $t thread(s)"
    local t0=$SECONDS
    guest bitdlm generate "def fibonacci(n):" --stats --max-tokens 32 --threads "$t"
    echo "generate, $t thread(s): $((SECONDS - t0)) s" | tee -a "$W/timings.txt"
  done
}

kernel_tests() {  # tests/test_kernels.py: every level the emulated CPU has, at 1 and 2 threads
  local t0=$SECONDS
  guest env OMP_NUM_THREADS=2 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m "not torch"
  echo "kernel tests: $((SECONDS - t0)) s" | tee -a "$W/timings.txt"
}

forward_checks() {
  # the references need torch + transformers and an x86 bitdlm: made here, checked there
  if ! PYTHONPATH=python:tests python3 -c "import bitdlm._core, transformers" 2>/dev/null; then
    echo "skipped: no x86 bitdlm._core (scripts/dev_build.sh) or no transformers on the host"
    return
  fi
  PYTHONPATH=python:tests python3 tests/arm/forward_check.py export "$W/cases"
  for t in 1 2; do
    local t0=$SECONDS
    # the installed bitdlm (python/ is not on the path there)
    guest env OMP_NUM_THREADS=$t python3 /src/tests/arm/forward_check.py check /cases
    echo "forward checks, $t thread(s): $((SECONDS - t0)) s" | tee -a "$W/timings.txt"
  done
}

main() {  # (a function: bash has read all of it before it starts)
  step host-tools host_tools
  step sysroot-download sysroot_download
  step sysroot-configure sysroot_configure
  step wheels wheels
  step venv venv
  step pip-install pip_install
  run_generate
  kernel_tests
  forward_checks
  echo "timings: $W/timings.txt"
}
main
