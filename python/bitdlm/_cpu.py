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


def other_load() -> float:
    """Runnable work on the machine besides this process: the larger of the 1-minute load
    average and the tasks running right now (/proc/loadavg's 4th field, less this one; the
    average lags a process that started seconds ago)."""
    try:
        with open("/proc/loadavg") as f:
            fields = f.read().split()
        return max(float(fields[0]), float(fields[3].split("/")[0]) - 1.0, 0.0)
    except (OSError, ValueError, IndexError):
        try:
            return max(os.getloadavg()[0], 0.0)
        except (OSError, AttributeError):
            return 0.0


def default_threads() -> int:
    """OMP_NUM_THREADS if set (at most MAX_THREADS), else the physical cores this process may run on (one
    thread per core: SMT siblings only add barrier waits) less the cores other work
    keeps busy: a thread that shares its core with another process stalls every
    barrier of the forward (2 threads beside one busy process ran 6-70x slower than 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), MAX_THREADS)
    cores = min(physical_cores(), MAX_THREADS)
    return max(1, cores - int(other_load() + 0.5))


# Iterations an idle OpenMP thread spins before it sleeps. libgomp's default (300000, about
# 10 ms) keeps a waiting thread on its core long after the thread it waits for was
# descheduled, which turns a little contention into a collapse; 3000 (about 50-200 us) still
# spans the gaps between the parallel regions of one forward. bench/e2e.py measures both.
SPIN_COUNT = "3000"


def bound_openmp_spin(environ=os.environ) -> None:
    """Bound the spin of idle OpenMP threads unless the user chose a wait policy. Must run
    before the OpenMP runtime loads (it reads the environment once): bitdlm/__init__.py."""
    if not any(k in environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")):
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT  # libgomp (GCC)
        environ["KMP_BLOCKTIME"] = "1"  # LLVM / Intel libomp: ms of spin (its default is 200)


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
