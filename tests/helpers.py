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


def cached_binary(name: str, files: list[str], build, tmp_path_factory) -> str:
    """The path of a test binary made from the repo-relative `files`, cached in the temp
    directory by their hash; build(out, tmpdir) makes it at `out` (asserting success)."""
    h = hashlib.sha256()
    for rel in files:
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(f.read())
    exe = os.path.join(tempfile.gettempdir(), f"bitdlm_{name}_{h.hexdigest()[:16]}")
    if not os.path.exists(exe):
        tmpdir = tmp_path_factory.mktemp(name)
        out = str(tmpdir / "harness")
        build(out, tmpdir)
        shutil.move(out, exe)
    return exe


def run_simde_harness(name: str, sources: list[str], headers: list[str], tmp_path_factory,
                      includes: tuple[str, ...] = ()) -> str:
    """Compile a SIMDe harness (AVX-512 code built without any -mavx512 flag) from repo-relative
    `sources`, cache the binary by the hash of sources + headers, run it and return its stdout
    (asserting exit code 0). `includes`: test headers injected with -include (the AMX tile emulator;
    product sources never include a test file). Skips where g++ or the SIMDe headers are missing."""
    cxx = shutil.which("g++")
    if cxx is None or not os.path.exists("/usr/include/simde/x86/avx512.h"):
        pytest.skip("needs g++ and SIMDe headers (Debian libsimde-dev)")

    def build(out, tmpdir):
        # -O0: the SIMDe build is the slow part (~5 s CPU), the run is instant
        cmd = [cxx, "-std=c++17", "-O0", "-Wno-psabi", "-DBITDLM_SIMDE", "-I", os.path.join(ROOT, "csrc"), "-o", out]
        for inc in includes:
            cmd += ["-include", os.path.join(ROOT, inc)]
        cmd += [os.path.join(ROOT, s) for s in sources]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]

    exe = cached_binary(name, sources + headers + list(includes), build, tmp_path_factory)
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:]
    return run.stdout
