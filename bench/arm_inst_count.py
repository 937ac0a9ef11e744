"""Instructions per weight of the aarch64 kernels' inner loops, counted statically.

Nothing here runs natively on ARM, so instead of speeds this compiles each ARM
level's tiles (csrc/kernels/gemm_arm.inc, -O3, the level's -march flags) with
aarch64-linux-gnu-g++, disassembles them and counts the instructions of the
innermost loop that holds the multiply-accumulates, per weight x token (MAC):

    python bench/arm_inst_count.py            # table on stdout (docs/kernels.md has it)

A static count, not a speed: it says how much work each MAC costs the front
end, not how the loads and the SDOT / SMMLA ports overlap on a given core.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = {"neon": [], "dotprod": ["-march=armv8.2-a+dotprod"], "i8mm": ["-march=armv8.2-a+dotprod+i8mm"]}
# multiply-accumulates per instruction (SMULL starts the SMLAL2 chain of the int8 lm_head)
MAC_OPS = {"sdot": 16, "smmla": 32, "smlal": 8, "smlal2": 8, "smull": 8, "smull2": 8, "fmla": 4}
# (function, rows, tokens, what)
TILES = {
    "neon": [("tern_2x4", 2, 4, "ternary GEMM (main tile)"), ("tern_4x1", 4, 1, "ternary GEMV (decode)"),
             ("i8_4x4", 4, 4, "int8 lm_head"), ("i8_4x1", 4, 1, "int8 lm_head, decode"),
             ("f16_4x2", 4, 2, "fp16 lm_head"), ("f16_4x1", 4, 1, "fp16 lm_head, decode")],
    "dotprod": [("tern_2x8", 2, 8, "ternary GEMM (main tile)"), ("tern_4x1", 4, 1, "ternary GEMV (decode)"),
                ("i8_4x4", 4, 4, "int8 lm_head"), ("i8_4x1", 4, 1, "int8 lm_head, decode")],
    "i8mm": [("tern_4x8", 4, 8, "ternary GEMM (main tile)"), ("tern_4x4", 4, 4, "ternary GEMM (4 tokens)"),
             ("tern_4x2", 4, 2, "ternary GEMM (2 tokens)")],
}

WRAPPERS = """
#define ARM_NS {level}
#include "kernels/gemm_arm.inc"
using namespace bitdlm;
using namespace bitdlm::{level};
#define TERN(R, T) extern "C" __attribute__((noinline)) void tern_##R##x##T(const uint8_t* w, int64_t ws, \\
    const int8_t* q, int64_t qs, int nb, int32_t d[R][8]) {{ ternary_tile<R, T>(w, ws, q, qs, nb, d); }}
TERN(2, 4) TERN(4, 1) TERN(2, 8) TERN(4, 8) TERN(4, 4) TERN(4, 2)
#define LM(K, A, P, R, T) extern "C" __attribute__((noinline)) void K##_##R##x##T(const K##Kern& k, int m, \\
    int len, const A* act, P p[][8]) {{ k.tile<R, T>(m, 0, len, act, 64, p); }}
LM(I8, int8_t, int32_t, 4, 4) LM(I8, int8_t, int32_t, 4, 1) LM(F16, float, float, 4, 2) LM(F16, float, float, 4, 1)
"""


def loops(objdump: str):
    """{function: [(instructions, Counter of mnemonics)] for every backward branch}"""
    out = {}
    for f in re.split(r"\n(?=[0-9a-f]+ <)", objdump):
        m = re.match(r"[0-9a-f]+ <([^>]+)>:", f)
        if not m:
            continue
        ins = [(int(a, 16), op, args) for a, op, args in re.findall(r"\n\s+([0-9a-f]+):\s+(\S+)\s*([^\n]*)", f)]
        found = []
        for a, op, args in ins:
            t = re.search(r"([0-9a-f]+) <", args)
            if t and re.match(r"(b|cbn?z|tbn?z)", op) and int(t.group(1), 16) <= a:
                body = [x[1] for x in ins if int(t.group(1), 16) <= x[0] <= a]
                found.append((len(body), Counter(body)))
        out[m.group(1)] = found
    return out


def main():
    cxx, objdump = shutil.which("aarch64-linux-gnu-g++"), shutil.which("aarch64-linux-gnu-objdump")
    if not cxx or not objdump:
        sys.exit("needs g++-aarch64-linux-gnu (Debian)")
    print("| level | loop | tile (rows x tokens) | instructions per loop trip | MAC instructions | MACs per trip | instructions per MAC |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for level, tiles in TILES.items():
            src, obj = os.path.join(tmp, f"{level}.cpp"), os.path.join(tmp, f"{level}.o")
            with open(src, "w") as f:
                f.write(WRAPPERS.format(level=level))
            subprocess.run([cxx, "-std=c++17", "-O3", "-w", *FLAGS[level], "-I", os.path.join(ROOT, "csrc"), "-c", src,
                            "-o", obj], check=True)
            dis = loops(subprocess.run([objdump, "-d", "--no-show-raw-insn", obj], capture_output=True, text=True,
                                       check=True).stdout)
            for fn, R, T, what in tiles:
                name = fn.replace("i8_", "I8_").replace("f16_", "F16_")
                keys = [name]
                if fn.startswith("tern"):  # the tile body may stay a function of its own
                    keys += [key for key in dis if re.search(rf"(dot|mmla)_tileILi{R}ELi{T}E", key)]
                body = [x for key in keys for x in dis.get(key, [])]
                # the innermost loop holding MACs: fewest instructions among loops with the most MAC ops per trip
                cands = [(n, c) for n, c in body if sum(c[o] for o in MAC_OPS) > 0]
                if not cands:
                    print(f"| {level} | {what} | {R} x {T} | (not found) | | |")
                    continue
                top = max(sum(c[o] for o in MAC_OPS) for _, c in cands)
                n, c = min((x for x in cands if sum(x[1][o] for o in MAC_OPS) == top), key=lambda x: x[0])
                macs = sum(c[o] * m for o, m in MAC_OPS.items())
                assert macs % (R * T) == 0, (fn, macs)  # whole k steps of the R x T tile
                print(f"| {level} | {what} | {R} x {T} | {n} | {top} | {macs} ({macs // (R * T)} k) | {n / macs:.3f} |")


if __name__ == "__main__":
    main()
