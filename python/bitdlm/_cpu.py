"""CPU facts the runtime needs (the thread default); no benchmark code here."""
from __future__ import annotations

import os

# Most OpenMP threads a forward may use, as llama.cpp's GGML_MAX_N_THREADS
# (the C++ core enforces the same bound): 10^5 crashed libgomp's team start and
# 10^4 never finished a step. More threads than cores only adds barrier waits.
MAX_THREADS = 512


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                pkg = f.read().strip()
            with open(base + "core_id") as f:
                core = f.read().strip()
            cores.add((pkg, core))
        except OSError:
            cores.add(("?", str(c)))
    return max(1, len(cores))


def default_threads() -> int:
    """OMP_NUM_THREADS if set (at most MAX_THREADS), else the physical cores
    this process may run on (one thread per core: SMT siblings only add barrier waits)."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), MAX_THREADS)
    return min(physical_cores(), MAX_THREADS)


def check_threads(n, what: str = "threads") -> int:
    """n as a thread count in [1, MAX_THREADS], else ValueError naming `what`."""
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            import operator

            n = operator.index(n)  # numpy integers; never floats or strings
        except TypeError:
            raise TypeError(f"{what} must be an integer, got {type(n).__name__}") from None
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{what} must be in [1, {MAX_THREADS}], got {n}")
    return int(n)


def threads_arg(text: str) -> int:
    """argparse type of --threads: a clear usage error (exit 2) out of range."""
    import argparse

    try:
        return check_threads(int(text), "--threads")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if text.strip().lstrip("-").isdigit()
                                         else f"invalid int value: {text!r}") from None
