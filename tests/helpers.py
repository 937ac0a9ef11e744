"""Small helpers shared by several test files (no torch, no bitdlm import)."""
from __future__ import annotations

import hashlib
import os
import re
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


_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.M)


def with_includes(files: list[str]) -> list[str]:
    """`files` (repo-relative) and every file they #include "..." from csrc/, tests/ or their own
    folder, transitively, in a stable order: what a test binary made from them depends on."""
    out, todo = [], list(files)
    while todo:
        rel = todo.pop(0)
        if rel in out:
            continue
        out.append(rel)
        with open(os.path.join(ROOT, rel), "rb") as f:
            text = f.read()
        for inc in _INCLUDE.findall(text):
            inc = inc.decode()
            for base in ("csrc", "tests", os.path.dirname(rel)):
                cand = os.path.normpath(os.path.join(base, inc))
                if os.path.exists(os.path.join(ROOT, cand)):
                    todo.append(cand)
                    break
    return out


def cached_binary(name: str, files: list[str], build, tmp_path_factory) -> str:
    """The path of a test binary made from the repo-relative `files`, cached in the temp
    directory by the hash of them and of everything they include (with_includes: a header left
    off a list cannot leave a stale binary); build(out, tmpdir) makes it at `out` (asserting
    success)."""
    h = hashlib.sha256()
    for rel in with_includes(files):
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
