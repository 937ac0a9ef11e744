#!/usr/bin/env python3
"""Compiler launcher that keeps object files across `pip install` runs.

pip builds every install in a fresh isolated environment, and scikit-build-core
then deletes the build tree's CMakeFiles/ (where CMake keeps the object files):
README's two commands compiled the whole core twice. CMakeLists.txt runs each
compile through this script (CMAKE_CXX_COMPILER_LAUNCHER), which looks the
object up by the hash of the preprocessed source (`-E -P`: no line markers, so
the per-install pybind11 path does not count, and __FILE__ in its headers is
mapped to a fixed name) plus the flags that change code
generation, in a cache folder outside CMakeFiles; a hit copies the object
instead of compiling (~1 s of preprocessing instead of ~20-60 s). The same idea
as ccache, which needs installing; with ccache on PATH CMakeLists.txt uses it.

    objcache.py CACHE_DIR COMPILER ARGS...
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys

# path-bearing flags: their values do not change the object once the
# preprocessed text is hashed (and the dependency file is written by -E too)
_PATH_FLAGS = {"-o", "-MF", "-MT", "-MQ", "-I", "-isystem", "-iquote"}


def main(argv) -> int:
    cache, cmd = argv[1], argv[2:]
    try:
        out = cmd[cmd.index("-o") + 1]
        src = cmd[cmd.index("-c") + 1]
    except (ValueError, IndexError):  # not a plain compile (a link, a probe): run it
        return subprocess.call(cmd)
    # pybind11's asserts embed __FILE__, which names the per-install build
    # environment: map it to one fixed name so both the hash and the object agree
    envs = sorted(set(re.findall(r"(/[^\s]*?/pip-build-env-[^/\s]+)", " ".join(cmd))))
    cmd = cmd[:1] + [f"-fmacro-prefix-map={e}=/pip-build-env" for e in envs] + cmd[1:]
    key = hashlib.sha256()
    skip = False
    for a in cmd[1:]:
        if skip:
            skip = False
            continue
        if a in _PATH_FLAGS:
            skip = True
            continue
        if a == src or a.startswith(("-I", "-isystem", "-iquote", "-fmacro-prefix-map=")):
            continue
        key.update(a.encode() + b"\0")
    key.update(os.path.basename(cmd[0]).encode())
    try:  # the compiler's version string: another compiler, another object
        key.update(subprocess.run([cmd[0], "--version"], capture_output=True, check=True).stdout)
        pre = [a for a in cmd if a != "-c"]
        pre[pre.index("-o") + 1] = "-"
        text = subprocess.run(pre[:1] + ["-E", "-P"] + pre[1:], capture_output=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return subprocess.call(cmd)  # let the real compile report the error
    key.update(text)
    hit = os.path.join(cache, key.hexdigest() + ".o")
    if os.path.exists(hit):
        shutil.copyfile(hit, out)
        return 0
    rc = subprocess.call(cmd)
    if rc == 0:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{hit}.{os.getpid()}"
        shutil.copyfile(out, tmp)
        os.replace(tmp, hit)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
