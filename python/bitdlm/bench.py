"""`bitdlm bench threads`: how the forward scales with OpenMP threads.

For each thread count a fresh worker process (OMP_NUM_THREADS set before the
OpenMP runtime starts) loads the model and times three phases through
`bitdlm.load(...).forward` (the `_core.Model` contract, docs/architecture.md):

- prefill: P prompt tokens written to the KV cache (tokens/s = P / time);
- decode:  one token against P cached positions, written (AR decoding);
- step32:  one 32-token diffusion step against P cached positions, not written,
           a selection (top-1 + confidence) at every position.

Those are the JSON keys; the table and the plot say "prefill (P tokens)",
"decode" and "32-token step", the words README.md and bench/README.md use.

The parent prints a table (threads, ms per step, tokens/s, speedup, parallel
efficiency), writes JSON and a PNG. `BitdlmRunner` is shared with
bench/compare.py. Never imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

BLOCK = 32      # diffusion block size used for the step cases
SUB_BLOCK = 8   # sub-block size (Fast-dLLM v2 small_block_size)


# ----------------------------------------------------------------------------- machine


from ._cpu import MAX_THREADS, physical_cores  # noqa: E402  (physical_cores re-exported: bench callers use bitdlm.bench.physical_cores)


def machine_info() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    isa = [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni") if f" {x}" in flags]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "isa": isa,
        "loadavg_at_start": load,
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def default_thread_counts(cores: int | None = None) -> list[int]:
    """1 .. physical cores, plus 2x cores to show oversubscription."""
    cores = cores or physical_cores()
    return sorted(set(list(range(1, cores + 1)) + [2 * cores]))


def parse_threads(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads wants a comma list of integers, got {text!r}") from None
    if not out or out[0] < 1 or out[-1] > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"--threads values must be in [1, {MAX_THREADS}]")
    return out


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Case:
    """One forward shape. kind: prefill | decode | block | subblock."""

    kind: str
    ctx: int  # cached positions the tokens attend to (the prompt length)

    @property
    def n(self) -> int:
        return {"decode": 1, "block": BLOCK, "subblock": SUB_BLOCK}.get(self.kind, self.ctx)

    @property
    def name(self) -> str:
        if self.kind == "prefill":
            return f"prefill{self.ctx}"
        return f"{self.kind}@{self.ctx}"


class BitdlmRunner:
    """Times single forwards of one sequence through bitdlm.load(...).forward.

    Cache layout: positions [0, ctx + BLOCK) are written once by `prepare`, so
    every case can run repeatedly without changing what the next one sees:
    - decode:   1 token at `ctx` against [0, ctx), written (AR decoding; it
                rewrites the same position each time);
    - block:    32 tokens at [ctx, ctx+32) against [0, ctx), not written
                (a Fast-dLLM v2 full-block denoising step);
    - subblock: 8 tokens at [ctx+8, ctx+16) against the block's cached K/V
                [0, ctx+32), not written (a sub-block-cache step);
    - prefill:  `ctx` tokens written into a fresh sequence.
    Every output goes through mode="select" (greedy top-1 + confidence), which is
    what the scheduler asks for; decode and prefill select one position, the
    steps select every position.
    """

    engine = "bitdlm"

    def __init__(self, model_path: str, threads: int | None = None, seed: int = 0):
        import bitdlm

        self.model = bitdlm.load(model_path, threads=threads)
        self.vocab = int(self.model.meta["vocab_size"])
        mask = self.model.meta.get("mask_token_id")
        self.banned = None if mask is None else [int(mask)]  # as the scheduler bans the mask token
        self.rng = np.random.default_rng(seed)
        self.seqs: dict[int, int] = {}

    def _tokens(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.vocab - 8, size=n, dtype=np.int32)

    def _forward(self, sid, tokens, start, ctx_len, write, out_idx):
        item = (sid, tokens, int(start), int(ctx_len), bool(write), np.asarray(out_idx, dtype=np.int32))
        return self.model.forward([item], BLOCK, "select", banned=self.banned)

    def prepare(self, ctx: int) -> None:
        if ctx in self.seqs:
            return
        sid = self.model.alloc_seq(ctx + BLOCK)
        total = ctx + BLOCK
        for s in range(0, total, 512):  # chunked like the engine's prefill
            n = min(512, total - s)
            self._forward(sid, self._tokens(n), s, s, True, [n - 1])
        self.seqs[ctx] = sid

    def run(self, case: Case) -> float:
        """One timed forward, in milliseconds (inputs built outside the timer)."""
        if case.kind == "prefill":
            sid = self.model.alloc_seq(case.ctx)
            toks = self._tokens(case.ctx)
            try:
                t0 = time.perf_counter()
                self._forward(sid, toks, 0, 0, True, [case.ctx - 1])
                return (time.perf_counter() - t0) * 1e3
            finally:
                self.model.free_seq(sid)
        self.prepare(case.ctx)
        sid = self.seqs[case.ctx]
        n = case.n
        toks = self._tokens(n)
        out = np.arange(1 if case.kind == "decode" else n, dtype=np.int32)
        if case.kind == "decode":
            args = (case.ctx, case.ctx, True)
        elif case.kind == "block":
            args = (case.ctx, case.ctx, False)
        elif case.kind == "subblock":
            args = (case.ctx + SUB_BLOCK, case.ctx + BLOCK, False)
        else:
            raise ValueError(f"unknown case kind {case.kind!r}")
        t0 = time.perf_counter()
        self._forward(sid, toks, *args, out)
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        for sid in self.seqs.values():
            self.model.free_seq(sid)
        self.seqs.clear()


def summarize(ms: list[float]) -> dict:
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "reps": len(ms),
        "all_ms": [round(x, 3) for x in ms],
    }


# ----------------------------------------------------------------------------- threads sweep

PHASES = ("prefill", "decode", "step32")  # JSON keys


def phase_label(phase: str, prompt: int) -> str:
    """The table's / plot's name of a phase (README.md's words)."""
    return {"prefill": f"prefill ({prompt} tokens)", "decode": "decode", "step32": "32-token step"}[phase]


def _phase_cases(prompt: int) -> dict[str, Case]:
    return {"prefill": Case("prefill", prompt), "decode": Case("decode", prompt), "step32": Case("block", prompt)}


def _phase_tokens(phase: str, prompt: int) -> int:
    """Tokens (positions) one forward of the phase processes."""
    return {"prefill": prompt, "decode": 1, "step32": BLOCK}[phase]


def _threads_worker(args) -> int:
    """Child process: time every phase at one thread count, one JSON line per phase."""
    out = os.fdopen(os.dup(1), "w", buffering=1)  # protocol channel; native logs go to stderr
    os.dup2(2, 1)
    runner = BitdlmRunner(args.model, threads=args.threads_one, seed=args.seed)
    cases = _phase_cases(args.prompt)
    for phase in PHASES:
        case = cases[phase]
        for _ in range(args.warmup):
            runner.run(case)
        ms = []
        deadline = time.perf_counter() + args.max_seconds
        for _ in range(args.reps):
            ms.append(runner.run(case))
            if time.perf_counter() > deadline:
                break
        out.write(json.dumps({"phase": phase, **summarize(ms)}) + "\n")
    runner.close()
    return 0


def child_pythonpath() -> str:
    """PYTHONPATH for a child process that must import this same bitdlm
    (an installed wheel, or a checkout without install) before any other."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)


def _run_threads_child(args, threads: int, on_phase) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = child_pythonpath()
    cmd = [sys.executable, "-m", "bitdlm.bench", "_threads_worker", "--model", args.model,
           "--threads-one", str(threads), "--reps", str(args.reps), "--warmup", str(args.warmup),
           "--prompt", str(args.prompt), "--seed", str(args.seed), "--max-seconds", str(args.max_seconds)]
    errf = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker cannot block
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=errf, text=True)
    watchdog = threading.Timer(args.timeout, proc.kill)  # a hung worker must not hang the sweep
    watchdog.start()
    results = {}
    try:
        for line in proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            results[rec.pop("phase")] = rec
            on_phase()
        rc = proc.wait(timeout=args.timeout)
        errf.seek(0)
        err = errf.read()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        watchdog.cancel()
        errf.close()
    if rc != 0 or len(results) != len(PHASES):
        raise RuntimeError(f"bench worker with {threads} threads failed (exit {rc}):\n{err[-2000:]}")
    return results


def threads_rows(results: dict[int, dict], prompt: int) -> list[dict]:
    """Flatten {threads: {phase: stats}} into table rows with speedup and efficiency
    relative to the smallest thread count measured."""
    rows = []
    base_t = min(results)
    for phase in PHASES:
        base_ms = results[base_t][phase]["median_ms"]
        for t in sorted(results):
            ms = results[t][phase]["median_ms"]
            speedup = base_ms / ms
            rows.append({
                "phase": phase,
                "label": phase_label(phase, prompt),
                "threads": t,
                "ms_per_step": ms,
                "tokens_per_s": _phase_tokens(phase, prompt) / ms * 1e3,
                "speedup": speedup,
                "efficiency": speedup * base_t / t,
            })
    return rows


def format_table(rows: list[dict]) -> str:
    w = max([len("phase")] + [len(r["label"]) for r in rows]) + 2
    head = f"{'phase':<{w}}{'threads':>8}{'ms/step':>11}{'tokens/s':>11}{'speedup':>9}{'efficiency':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<{w}}{r['threads']:>8}{r['ms_per_step']:>11.2f}"
                     f"{r['tokens_per_s']:>11.1f}{r['speedup']:>8.2f}x{r['efficiency'] * 100:>11.0f}%")
    return "\n".join(lines)


def format_load(load) -> str:
    """os.getloadavg() as "1.23 0.98 0.75" (it comes as 3.2392578125)."""
    return " ".join(f"{x:.2f}" for x in load) if load else "unknown"


def threads_title(model: str, info: dict, cores: int, prompt: int) -> str:
    return (f"bitdlm thread scaling, {os.path.basename(model)}, {info['cpu']} ({cores} cores), "
            f"prompt {prompt}, load average at start {format_load(info['loadavg_at_start'])}")


def plot_threads(rows: list[dict], cores: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for phase in PHASES:
        rs = [r for r in rows if r["phase"] == phase]
        ts = [r["threads"] for r in rs]
        a1.plot(ts, [r["tokens_per_s"] for r in rs], marker="o", label=rs[0]["label"])
        a2.plot(ts, [r["speedup"] for r in rs], marker="o", label=rs[0]["label"])
    ts = sorted({r["threads"] for r in rows})
    a2.plot(ts, [t / ts[0] for t in ts], "k:", label="ideal")
    for a in (a1, a2):
        a.axvline(cores, color="grey", lw=0.8, ls="--")
        a.set_xlabel("OpenMP threads (dashed: physical cores)")
        a.set_xticks(ts)
        a.legend(fontsize=8)
    a1.set_ylabel("tokens/s (positions per second)")
    a1.set_yscale("log")
    a2.set_ylabel("speedup")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_threads(args) -> int:
    from tqdm import tqdm

    if args.model is None:
        from .data import chosen_model_path as default_model_path

        args.model = default_model_path()
        if args.model is None:
            raise SystemExit("bitdlm bench threads: no --model given and no packaged default model found")
    if not os.path.isfile(args.model):
        raise SystemExit(f"bitdlm bench threads: no such model file: {args.model}")
    cores = physical_cores()
    counts = args.threads or default_thread_counts(cores)
    info = machine_info()
    results: dict[int, dict] = {}
    with tqdm(total=len(counts) * len(PHASES), desc="bench threads", unit="phase") as bar:
        for t in counts:
            bar.set_postfix(threads=t)
            results[t] = _run_threads_child(args, t, bar.update)
    rows = threads_rows(results, args.prompt)
    print(format_table(rows))
    print(f"(32-token step = one diffusion step of a 32-token block against the {args.prompt} cached "
          f"prompt tokens; median of {args.reps} reps; machine: {info['cpu']}, {cores} physical cores, "
          f"load average at start {format_load(info['loadavg_at_start'])})")
    doc = {
        "benchmark": "bitdlm bench threads",
        "model": os.path.abspath(args.model),
        "prompt_tokens": args.prompt,
        "reps": args.reps,
        "machine": info,
        "results": {str(t): v for t, v in results.items()},
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot_threads(rows, cores, args.plot, threads_title(args.model, info, cores, args.prompt))
        print(f"wrote {args.plot}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmarks (see bench/README.md)",
        description="Benchmarks of the installed engine. `bitdlm bench threads` times prefill, decoding and "
                    "a 32-token diffusion step at each OpenMP thread count. The comparison with llama.cpp "
                    "and PyTorch (bench/compare.py), the forward's phase profile (bench/forward.py) and the "
                    "kernel roofline (bench/kernels.py) are scripts in the source tree: see bench/README.md.")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    t = sub.add_parser(
        "threads", help="OpenMP thread-count sweep: prefill, decode, 32-token diffusion step",
        description="Time prefill, one-token decoding and one 32-token diffusion step at each thread count, "
                    "one fresh worker process per count (OMP_NUM_THREADS set before OpenMP starts). "
                    "Prints a table (ms per step, tokens/s, speedup, parallel efficiency); "
                    "--json and --plot also write the results.")
    t.add_argument("--model", default=None,
                   help="a bitdlm .bin model (default: $BITDLM_MODEL, else the packaged default model)")
    t.add_argument("--threads", type=parse_threads, default=None,
                   help="comma list, e.g. 1,2,4 (default: 1..physical cores, plus 2x cores)")
    t.add_argument("--reps", type=int, default=5, help="timed repetitions per phase")
    t.add_argument("--warmup", type=int, default=1, help="untimed forwards per phase before the timed ones")
    t.add_argument("--prompt", type=int, default=128, help="prompt / cached context length in tokens")
    t.add_argument("--seed", type=int, default=0, help="seed of the random token ids fed to the model")
    t.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop repeating a phase after this many seconds")
    t.add_argument("--timeout", type=float, default=600.0,
                   help="kill a worker (one thread count) after this many seconds")
    t.add_argument("--json", default=None, help="write results JSON here")
    t.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    t.set_defaults(func=_check_and_run)


def _check_and_run(args) -> int:
    """Everything that can fail after the sweep is checked before it (minutes of work)."""
    if args.reps < 1 or args.warmup < 0 or args.prompt < 1:
        raise SystemExit("bitdlm bench threads: --reps >= 1, --warmup >= 0, --prompt >= 1")
    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise SystemExit(f"bitdlm bench threads: --{flag} {path}: directory does not exist")
    if args.plot:
        from .cli import require

        require("matplotlib", "--plot")
    return cmd_threads(args)


def _worker_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="bitdlm.bench _threads_worker")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads-one", type=int, required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    return _threads_worker(ap.parse_args(argv))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_threads_worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: bitdlm bench threads --model M.bin (this module's entry point is the bitdlm CLI)")
