"""Make a small, self-contained source archive of bitnet.cpp (microsoft/BitNet with the
llama.cpp fork it pins) for a CPU-only build on a machine without network
(bench/build_bitnet_bench.sh builds it), as bench/llama_trim.py does for llama.cpp.

    python bench/bitnet_trim.py --bitnet-git BitNet --llama-git llama.cpp bench/out/bitnet-cpu.tar.gz

Sources are read from git clones (`git -C DIR archive COMMIT`), nothing of them is
committed here:
  * microsoft/BitNet at c82b5e6 (2024-10-18, "update 3rdparty/llama.cpp") and
  * Eddie-Wang1120/llama.cpp at 406a503 (branch merge-dev), the exact submodule
    commit that BitNet commit pins. Later BitNet commits pin fork commits that
    are no longer on any branch of Eddie-Wang1120/llama.cpp (or moved to
    isHuangXin/llama.cpp); this pair is the newest one whose both halves are
    public branches, and it has the I2_S / TL1 / TL2 ggml types and the
    x86 TL2 LUT kernels.

What the archive holds (bitnet/ inside):
  * BitNet's CMakeLists.txt, LICENSE, include/ggml-bitnet.h, src/ggml-bitnet-{mad,lut}.cpp;
  * include/bitnet-lut-kernels.h + include/kernel_config.ini: the TL2 kernels for
    the model shapes, generated HERE by running BitNet's own utils/codegen_tl2.py
    (as its setup_env.py does) with the shapes added to its table: the 2B-4T
    shape (bench/make_synthetic_model.py SHAPE_2B) and the tiny test shape.
    TL2 kernels exist only for the (M, K) pairs generated in; the other types
    (I2_S, TQ2_0) need none. Two edits of the generated text (patch_tl2):
      - gcc: their LUT array is declared __m256 but holds __m256i values, an
        implicit conversion only clang accepts; it is declared __m256i, the same
        edit BitNet made itself a week later (141ddfd, "Fix compiler errors on GCC");
      - batches: the kernels store the result of every token of a batch into the
        first token's row (C[i] for each token b), so a prompt of n > 1 tokens
        leaves rows 1..n-1 unwritten (garbage / NaN logits; decode is right). The
        store goes to row b (C[i + b * M]) instead; same work, correct output.
        BitNet's codegen_tl2.py still has this store at its newest commit;
  * src/CMakeLists.txt replaced: BitNet's only stops with "Clang is required"
    (its sources are compiled from ggml/src/CMakeLists.txt of the fork); with the
    edit above gcc 12 builds everything, so the check is dropped;
  * 3rdparty/llama.cpp/: the fork trimmed to ggml (CPU), libllama, common and
    examples/llama-bench (its examples/CMakeLists.txt replaced by one line).
"""
from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BITNET_COMMIT = "c82b5e6"
LLAMA_COMMIT = "406a503"

BITNET_KEEP = {"CMakeLists.txt", "LICENSE", "include/ggml-bitnet.h", "src/ggml-bitnet-mad.cpp",
               "src/ggml-bitnet-lut.cpp"}
LLAMA_KEEP_TOP = {"CMakeLists.txt", "cmake", "common", "src", "include", "ggml", "LICENSE"}
# ggml/src entries of other backends (their options stay OFF; CMake never reads them)
LLAMA_DROP_GGML_SRC = {"ggml-cuda", "ggml-sycl", "ggml-cann", "kompute", "kompute-shaders", "vulkan-shaders",
                       "ggml-cuda.cu", "ggml-sycl.cpp", "ggml-vulkan.cpp", "ggml-kompute.cpp", "ggml-cann.cpp",
                       "ggml-metal.m", "ggml-metal.metal"}
SRC_CMAKE = b"# trimmed by bitdlm's bench/bitnet_trim.py: BitNet's src/CMakeLists.txt only refused\n" \
            b"# compilers other than Clang; its sources are built from ggml/src/CMakeLists.txt.\n"
EXAMPLES_CMAKE = b"# trimmed by bitdlm's bench/bitnet_trim.py: llama-bench only\nadd_subdirectory(llama-bench)\n"

TL2_BK = 96  # K block of the three-weight LUT part; BitNet's x86 presets all use 96
TL2_THREADS = 16  # BM is chosen for balanced row tiles at this thread count


def tl2_bm(m: int) -> int:
    """Row block of a TL2 kernel: a multiple of 32 dividing M, at most 256, whose tile
    count M/BM splits best over TL2_THREADS threads (their kernel hands each thread
    ceil(tiles/threads) whole tiles); ties go to the larger block."""
    cands = [b for b in range(32, min(m, 256) + 1, 32) if m % b == 0]
    if not cands:
        raise ValueError(f"TL2 needs M divisible by 32, got M={m}")

    def balance(b):
        tiles = m // b
        return tiles / (-(-tiles // TL2_THREADS) * TL2_THREADS)

    return max(cands, key=lambda b: (balance(b), b))


def model_shapes(shape: dict) -> list[tuple[int, int]]:
    """(M, K) of every ternary matmul of a BitNet shape (q/o, k/v, gate/up, down)."""
    h, f = shape["hidden"], shape["ffn"]
    kv = h // shape["heads"] * shape["kv_heads"]
    return [(h, h), (kv, h), (f, h), (h, f)]


def git_files(repo: str, commit: str, paths: list[str]):
    """Yield (path, TarInfo, bytes|None) of `paths` at a commit via `git archive` (no
    checkout; only these paths, so large files elsewhere need not be present)."""
    p = subprocess.run(["git", "-C", repo, "archive", "--format=tar", commit, "--", *paths], capture_output=True)
    if p.returncode:
        raise SystemExit(f"git archive {commit} in {repo} failed: {p.stderr.decode()[-500:]}")
    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as t:
        for m in t:
            data = t.extractfile(m).read() if m.isfile() else None
            yield m.name.rstrip("/"), m, data


def keep_llama(rel: str) -> bool:
    parts = rel.split("/")
    if parts[0] == "examples":
        return len(parts) == 1 or parts[1] in ("CMakeLists.txt", "llama-bench")
    if parts[0] not in LLAMA_KEEP_TOP:
        return False
    return not (parts[:2] == ["ggml", "src"] and len(parts) >= 3 and parts[2] in LLAMA_DROP_GGML_SRC)


def gen_tl2(codegen_src: bytes, shapes: list[tuple[int, int]]) -> dict[str, bytes]:
    """Run BitNet's utils/codegen_tl2.py for `shapes` (added to its model table as
    "bitdlm"); returns {"include/bitnet-lut-kernels.h": ..., "include/kernel_config.ini": ...}."""
    anchor = b"ModelShapeDict = {"
    if codegen_src.count(anchor) != 1:
        raise SystemExit("utils/codegen_tl2.py: model shape table not found (other BitNet commit?)")
    table = b"".join(b"[%d, %d], " % s for s in shapes)
    src = codegen_src.replace(anchor, anchor + b'\n        "bitdlm": [' + table + b"],")
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "utils"))
        os.makedirs(os.path.join(d, "include"))
        with open(os.path.join(d, "utils", "codegen_tl2.py"), "wb") as f:
            f.write(src)
        arg = lambda xs: ",".join(str(x) for x in xs)  # noqa: E731
        cmd = [sys.executable, os.path.join(d, "utils", "codegen_tl2.py"), "--model", "bitdlm",
               "--BM", arg(tl2_bm(m) for m, _ in shapes), "--BK", arg(TL2_BK for _ in shapes),
               "--bm", arg(32 for _ in shapes)]
        subprocess.run(cmd, check=True, cwd=d)
        out = {}
        for name in ("bitnet-lut-kernels.h", "kernel_config.ini"):
            with open(os.path.join(d, "include", name), "rb") as f:
                out["include/" + name] = f.read()
    out["include/bitnet-lut-kernels.h"] = patch_tl2(out["include/bitnet-lut-kernels.h"], len(shapes))
    return out


def patch_tl2(text: bytes, n_shapes: int) -> bytes:
    """The two edits of the generated TL2 kernels (see the module docstring)."""
    def sub(pattern, repl, want):
        nonlocal text
        text, n = re.subn(pattern, repl, text)
        if n != want:
            raise SystemExit(f"generated TL2 kernels: {pattern!r} matched {n} times, expected {want} "
                             "(other BitNet commit?)")
    sub(rb"__m256 vec_lut\[16\];", b"__m256i vec_lut[16];", 2)
    # the stores of token bs: three_qgemm's (=), two_qgemm's (+=) and its float conversion
    sub(rb"\(\(int32_t\*\)C\)\[i\]( = \(int32_t\)\(\(\(int32_t\*\)CBits\)\[i \+ bs \* BM)(\d+)(_\d+\]\);)",
        rb"((int32_t*)C)[i + bs * \2]\1\2\3", n_shapes)
    sub(rb"\(\(int32_t\*\)C\)\[i\]( \+= \(int32_t\)\(\(\(int32_t\*\)CBits\)\[i \+ bs \* BM)(\d+)(_\d+\]\);\s*)"
        rb"\(\(float\*\)C\)\[i\] = \(float\)\(\(\(int32_t\*\)C\)\[i\]\)",
        rb"((int32_t*)C)[i + bs * \2]\1\2\3((float*)C)[i + bs * \2] = (float)(((int32_t*)C)[i + bs * \2])", n_shapes)
    return text


def add(dst: tarfile.TarFile, name: str, data: bytes, like: tarfile.TarInfo | None = None):
    info = like if like is not None else tarfile.TarInfo(name)
    info.name = name
    info.size = len(data)
    dst.addfile(info, io.BytesIO(data))


def main(argv=None) -> int:
    from gguf_export import read_tl2_config
    from make_synthetic_model import SHAPE_2B, SHAPE_TINY

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output .tar.gz (bitnet/ inside)")
    p.add_argument("--bitnet-git", required=True, help="clone of microsoft/BitNet (or its git dir)")
    p.add_argument("--bitnet-commit", default=BITNET_COMMIT)
    p.add_argument("--llama-git", required=True, help="clone of Eddie-Wang1120/llama.cpp (or its git dir)")
    p.add_argument("--llama-commit", default=LLAMA_COMMIT)
    a = p.parse_args(argv)

    shapes = []
    for s in (SHAPE_2B, SHAPE_TINY):
        shapes += [x for x in model_shapes(s) if x not in shapes]
    n = size = 0
    with tarfile.open(a.out, "w:gz") as dst:
        codegen = None
        for rel, m, data in git_files(a.bitnet_git, a.bitnet_commit, sorted(BITNET_KEEP) + ["utils/codegen_tl2.py"]):
            if rel == "utils/codegen_tl2.py":
                codegen = data
            if rel in BITNET_KEEP and m.isfile():
                add(dst, "bitnet/" + rel, data, m)
                n, size = n + 1, size + len(data)
        if codegen is None:
            raise SystemExit(f"no utils/codegen_tl2.py in BitNet {a.bitnet_commit}")
        generated = gen_tl2(codegen, shapes)
        generated["src/CMakeLists.txt"] = SRC_CMAKE
        for rel, data in generated.items():
            add(dst, "bitnet/" + rel, data)
        for rel, m, data in git_files(a.llama_git, a.llama_commit, sorted(LLAMA_KEEP_TOP) + ["examples/CMakeLists.txt",
                                                                                    "examples/llama-bench"]):
            if rel == "examples/CMakeLists.txt":
                data = EXAMPLES_CMAKE
            if m.isfile() and keep_llama(rel):
                add(dst, "bitnet/3rdparty/llama.cpp/" + rel, data, m)
                n, size = n + 1, size + len(data)
    cfg = read_tl2_config(a.out)  # read back: what bench/gguf_export.py lays TL2 weights out by
    print(f"wrote {a.out}: {n} files, {size / 2**20:.1f} MiB uncompressed, "
          f"{os.path.getsize(a.out) / 2**20:.1f} MiB; TL2 kernels (M, K): (BM, BK) {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
