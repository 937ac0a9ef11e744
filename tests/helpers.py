"""Small helpers shared by several test files (no torch, no bitdlm import)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(pred, timeout=15.0, interval=0.05):
    """Poll pred() until it returns something truthy or `timeout` seconds pass; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()


def run_simde_harness(name: str, sources: list[str], headers: list[str], tmp_path_factory,
                      includes: tuple[str, ...] = ()) -> str:
    """Compile a SIMDe harness (AVX-512 code built without any -mavx512 flag) from repo-relative
    `sources`, cache the binary by the hash of sources + headers, run it and return its stdout
    (asserting exit code 0). `includes`: test headers injected with -include (the AMX tile emulator;
    product sources never include a test file). Skips where g++ or the SIMDe headers are missing."""
    cxx = shutil.which("g++")
    if cxx is None or not os.path.exists("/usr/include/simde/x86/avx512.h"):
        pytest.skip("needs g++ and SIMDe headers (Debian libsimde-dev)")
    h = hashlib.sha256()
    for rel in sources + headers + list(includes):
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(f.read())
    # -O0: the SIMDe build is the slow part (~5 s CPU), the run is instant
    exe = os.path.join(tempfile.gettempdir(), f"bitdlm_{name}_{h.hexdigest()[:16]}")
    if not os.path.exists(exe):
        tmp = str(tmp_path_factory.mktemp(name) / "harness")
        cmd = [cxx, "-std=c++17", "-O0", "-Wno-psabi", "-DBITDLM_SIMDE", "-I", os.path.join(ROOT, "csrc"), "-o", tmp]
        for inc in includes:
            cmd += ["-include", os.path.join(ROOT, inc)]
        cmd += [os.path.join(ROOT, s) for s in sources]
        build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert build.returncode == 0, build.stderr[-4000:]
        shutil.move(tmp, exe)
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:]
    return run.stdout
