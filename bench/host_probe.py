"""Is this host fit for multi-thread timings? Prints the OpenMP fork + join and barrier costs.

    PYTHONPATH=python python3 bench/host_probe.py [--threads 16,15,8,1] [--max-fork-us 40] [--json out.json]

On a VM whose vCPUs the hypervisor takes away (another tenant, a host process), an
empty 16-thread parallel region costs hundreds of microseconds instead of a few
(session 13: ~650 us on one device host, 3.9 us on the next), and every multi-thread
figure taken there is noise. Reports, per thread count, `bench_omp_costs` (bench
builds: BITDLM_BENCH_KERNELS=1 scripts/dev_build.sh): the mean us of an empty parallel
region and of one barrier inside a running region; and the share of CPU time the
hypervisor stole meanwhile (/proc/stat). --max-fork-us: exit status 3 when the fork
at the most threads is above it (a device script can stop there and save its budget).
The barrier against the fork is also what one parallel region per forward, with
barriers between the ops, would save per op. Never imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
from bitdlm import _core  # noqa: E402


def cpu_times() -> list[int] | None:
    """The aggregate 'cpu' line of /proc/stat (user nice system idle iowait irq softirq steal ...)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    n = os.cpu_count() or 1
    ap.add_argument("--threads", default=",".join(str(t) for t in sorted({n, max(1, n - 1), max(1, n // 2), 1},
                                                                         reverse=True)))
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--max-fork-us", type=float, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not hasattr(_core, "bench_omp_costs"):
        print("bench_omp_costs is missing: build with BITDLM_BENCH_KERNELS=1 scripts/dev_build.sh")
        return 2
    threads = [int(t) for t in a.threads.split(",")]
    before = cpu_times()
    rows = [_core.bench_omp_costs(t, a.reps) for t in threads]
    after = cpu_times()
    steal = None
    if before and after and len(before) > 7:
        d = [y - x for x, y in zip(before, after)]
        steal = 100.0 * d[7] / max(1, sum(d[:8]))
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"host probe: {n} CPUs, load {load and [round(x, 2) for x in load]}, "
          f"steal {'?' if steal is None else f'{steal:.1f}%'} during the probe")
    print(f"{'threads':>7} {'fork us':>9} {'barrier us':>10}")
    for r in rows:
        print(f"{r['threads']:>7} {r['fork_us']:9.2f} {r['barrier_us']:10.2f}")
    top = max(rows, key=lambda r: r["threads"])
    ok = a.max_fork_us is None or top["fork_us"] <= a.max_fork_us
    if not ok:
        print(f"UNFIT: {top['fork_us']:.1f} us per fork at {top['threads']} threads > {a.max_fork_us}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpus": n, "load": load, "steal_pct": steal, "rows": rows, "fit": ok}, f, indent=1)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
