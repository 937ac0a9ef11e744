"""Trim the llama.cpp source inside a llama-cpp-python sdist to what `llama-bench` and
`llama-batched-bench` need on a CPU (ggml core + CPU backend, libllama, common,
tools/llama-bench, tools/batched-bench), so the
reference engine can travel to a machine without network (a few MB instead of the
76 MB sdist) and be built there with `bench/build_llama_bench.sh`.

    python bench/llama_trim.py llama_cpp_python-0.3.36.tar.gz bench/out/llama-cpu.tar.gz

Nothing of llama.cpp is committed here: the archive is made from the sdist a user
downloads (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`).
"""
from __future__ import annotations

import argparse
import io
import sys
import tarfile

# top-level entries of vendor/llama.cpp that the CPU build of llama-bench reads
KEEP_TOP = {"CMakeLists.txt", "cmake", "common", "src", "include", "ggml", "vendor", "LICENSE", "licenses"}
# ggml/src/ggml-*: every backend folder except the CPU one is dropped (their options stay OFF)
KEEP_BACKENDS = {"ggml-cpu"}
DROP_VENDOR: set = set()  # vendor/CMakeLists.txt adds every folder

TOOLS = ("llama-bench", "batched-bench")  # tg / pp of one stream; AR throughput of N parallel streams
TOOLS_CMAKE = b"""# trimmed by bitdlm's bench/llama_trim.py: llama-bench and llama-batched-bench only
find_package(Threads REQUIRED)
llama_add_compile_flags()
"""


def tools_cmake(found) -> bytes:
    """tools/CMakeLists.txt for the tools the sdist has (older ones lack batched-bench)."""
    return TOOLS_CMAKE + b"".join(b"add_subdirectory(%s)\n" % t.encode() for t in TOOLS if t in found)


def keep(rel: str) -> bool:
    parts = rel.split("/")
    if not parts or parts[0] not in KEEP_TOP | {"tools"}:
        return False
    if parts[0] == "tools":
        return len(parts) >= 2 and parts[1] in TOOLS
    if parts[0] == "ggml" and len(parts) >= 3 and parts[1] == "src" and parts[2].startswith("ggml-") \
            and "." not in parts[2] and parts[2] not in KEEP_BACKENDS:
        return False
    if parts[0] == "vendor" and len(parts) >= 2 and parts[1] in DROP_VENDOR:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sdist", help="llama_cpp_python-*.tar.gz")
    p.add_argument("out", help="output .tar.gz (llama.cpp/ inside)")
    a = p.parse_args(argv)
    n = size = 0
    found = set()
    with tarfile.open(a.sdist) as src, tarfile.open(a.out, "w:gz") as dst:
        marker = "/vendor/llama.cpp/"
        for m in src:
            i = m.name.find(marker)
            if i < 0 or not (m.isfile() or m.isdir()):
                continue
            rel = m.name[i + len(marker):]
            if not keep(rel):
                continue
            if rel.startswith("tools/") and rel.count("/") >= 2:
                found.add(rel.split("/")[1])
            data = src.extractfile(m).read() if m.isfile() else None
            m.name = "llama.cpp/" + rel
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
            n += 1
            size += m.size if m.isfile() else 0
        info = tarfile.TarInfo("llama.cpp/tools/CMakeLists.txt")
        text = tools_cmake(found)
        info.size = len(text)
        dst.addfile(info, io.BytesIO(text))
    if n == 0:
        print(f"error: {a.sdist} holds no vendor/llama.cpp", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {n} entries, {size / 2**20:.1f} MiB uncompressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
