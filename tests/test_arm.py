"""The aarch64 kernels (neon / dotprod / i8mm) on x86 machines, under user-mode emulation.

tests/arm/harness.cpp and the ARM kernel sources are cross-compiled with
aarch64-linux-gnu-g++ (each gemm_<level>.cpp with the flags CMakeLists.txt gives it)
and run under qemu-aarch64 as three CPUs: `max` (dotprod + i8mm), `neoverse-n1`
(dotprod, no i8mm) and `cortex-a53` (neither). The harness checks that the
dispatcher's HWCAP detection reports exactly the levels of that CPU and that every
table it runs agrees with the scalar reference (ternary, int8 lm_head and quantizer
bit for bit, fp16 lm_head within rounding), the NEON attention table against the
portable one (conversions bit for bit, sums within 1e-5 of their magnitude, the online
softmax's exps within 2e-6) and the NEON greedy select against the portable one (the same
token). Skipped where the cross compiler or qemu-user are missing (.ci/run installs them).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers import ROOT, cached_binary

# Per-file flags, as CMakeLists.txt sets them for aarch64 (the rest: none).
_UNITS = {
    "tests/arm/harness.cpp": [],
    "csrc/kernels/dispatch.cpp": [],
    "csrc/kernels/team_clock.cpp": [],
    "csrc/kernels/gemm_scalar.cpp": [],
    "csrc/kernels/gemm_neon.cpp": [],
    "csrc/kernels/gemm_dotprod.cpp": ["-march=armv8.2-a+dotprod"],
    "csrc/kernels/gemm_i8mm.cpp": ["-march=armv8.2-a+dotprod+i8mm"],
    "csrc/model/attention.cpp": [],
    "csrc/model/attention_neon.cpp": [],
    "csrc/model/sampling.cpp": [],
    "csrc/model/sampling_neon.cpp": [],
}
_HEADERS = ["csrc/kernels/gemm_arm.inc", "csrc/kernels/isa.h", "csrc/kernels/isa_table.h", "csrc/kernels/gemm.h",
            "csrc/kernels/job_ranges.h", "csrc/kernels/team_clock.h",
            "csrc/kernels/ternary_driver.h", "csrc/kernels/lm_driver.h", "csrc/kernels/epilogue.h",
            "csrc/model/attention.h", "csrc/model/half.h", "csrc/model/softmax_tile.inc",
            "csrc/model/simd_neon.h", "csrc/model/sampling.h", "tests/kernel_checks.h",
            "tests/test_arm.py"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (Debian)")

    def build(out, tmpdir):
        # -O1: enough to keep the NEON intrinsics in registers, quicker to build than -O3;
        # static, so qemu needs no aarch64 sysroot at run time
        base = [cxx, "-std=c++17", "-O1", "-fopenmp", "-Wall", "-Wno-unused-parameter", "-I", os.path.join(ROOT, "csrc")]
        objs, procs = [], []
        for src, flags in _UNITS.items():
            obj = str(tmpdir / (os.path.basename(src) + ".o"))
            objs.append(obj)
            procs.append(subprocess.Popen(base + flags + ["-c", os.path.join(ROOT, src), "-o", obj],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for p in procs:
            log = p.communicate(timeout=600)[0]
            assert p.returncode == 0, log[-4000:]
        link = subprocess.run(base + ["-static", "-o", out] + objs, capture_output=True, text=True, timeout=600)
        assert link.returncode == 0, link.stderr[-4000:]

    exe = cached_binary("arm_harness", list(_UNITS) + _HEADERS, build, tmp_path_factory)

    def run(cpu, levels, **env):
        res = subprocess.run([qemu, "-cpu", cpu, exe, levels], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, **env))
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
        return res.stdout

    return run


@pytest.mark.parametrize("cpu,levels", [("max", "scalar,neon,dotprod,i8mm"), ("neoverse-n1", "scalar,neon,dotprod"),
                                        ("cortex-a53", "scalar,neon")])
def test_arm_kernels_bit_exact_under_qemu(harness, cpu, levels):
    out = harness(cpu, levels)
    assert out.strip().splitlines()[-1].startswith("OK"), out[-4000:]
    assert " 0 failed" in out
    # the best level is picked; levels the CPU lacks are refused with the reason
    assert f"picked: {levels.split(',')[-1]}" in out
    for missing in {"dotprod", "i8mm"} - set(levels.split(",")):
        assert f"ISA '{missing}' is not supported by this CPU (the CPU reports no" in out


def test_arm_bitdlm_isa_override_under_qemu(harness):
    assert "picked: neon" in harness("max", "scalar,neon,dotprod,i8mm", BITDLM_ISA="neon")


def test_a_harness_binary_depends_on_every_file_its_sources_include():
    """cached_binary hashes what the sources include as well as the listed files: the NEON
    attention's softmax_tile.inc once stayed off this file's list, and a change to it ran the old
    harness binary (a mutant of it passed)."""
    from helpers import with_includes

    deps = with_includes(list(_UNITS))
    assert "csrc/model/softmax_tile.inc" in deps and "csrc/kernels/gemm_arm.inc" in deps
    assert "csrc/kernels/job_ranges.h" in deps and "tests/kernel_checks.h" in deps
    assert len(deps) == len(set(deps))
