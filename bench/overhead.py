"""The engine's Python cost per forward at 1, 16 and 64 concurrent requests.

Runs `LLM.generate` with --batch prompts at once (max_batch = the largest batch) and
times every `_core.forward` (bench/e2e.py's TimedCore): what is left of the wall time
is the Python side of each engine step (scheduler, plan/apply, numpy, selection,
detokenizer, output processing). `--fake` replaces the forward by a stand-in that
returns deterministic tokens and confidences at once, so the Python cost is all
there is (and a profile shows only it); the real forward (default) gives the same
outside time, only under a noisier clock.

    python bench/overhead.py --batch 1,16,64                 # shipped tiny model, real forward
    python bench/overhead.py --fake --profile 25 --batch 64  # cProfile of the Python side
    python bench/overhead.py --model bench/out/synth2b-i8.bin --threads 16 --json o.json  # SPR
    python bench/overhead.py --mode threshold --batch 1 --repetition-penalty 1.000001  # penalties' cost

Modes (--mode): `steps` (LLaDA's fixed rate, 2 tokens per decoding step, prefix
cache), `dual` (the same with the sub-block cache), `ar` (block_length 1),
`threshold` (the model's default rule), `adaptive-ar` (an adaptive engine whose cost
curves price AR far below diffusion, so it assigns every request AR, as it did at 64
concurrent server requests; the requests as `bitdlm serve --decode-policy adaptive
--steps 16` makes them: to compare with `ar`, the same tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.join(os.path.dirname(HERE), "python"))  # the checkout, unless an install has bitdlm

from e2e import TimedCore, prompt_ids  # noqa: E402


class CpuTimedCore(TimedCore):
    """TimedCore plus the calling thread's CPU time in the forward: on a loaded machine the
    thread's CPU time outside the core is a steadier measure of the Python cost than wall time."""

    def __init__(self, core):
        super().__init__(core)
        self.cpu = 0.0

    def forward(self, *a, **kw):
        c0 = time.thread_time()
        try:
            return self._forward(*a, **kw)
        finally:
            self.cpu += time.thread_time() - c0

    def _forward(self, *a, **kw):
        return TimedCore.forward(self, *a, **kw)

    def __setattr__(self, name, value):
        if name in ("cpu", "vocab"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class FakeCore(CpuTimedCore):
    """A forward that costs nothing: token = a hash of the input token and position (never a
    special id below 4, never the last 8), confidence from the same hash; logits rows are zeros."""

    def __init__(self, core, vocab: int):
        super().__init__(core)
        self.vocab = vocab

    def _forward(self, items, block_size, mode="logits", *a, **kw):
        import numpy as np

        t0 = time.perf_counter()
        try:
            toks, confs = [], []
            for _sid, tokens, start, _ctx, _w, out in items:
                out = np.asarray(out, np.int64)
                h = (np.asarray(tokens, np.int64)[out] * 2654435761 + (start + out) * 40503) % 1000003
                toks.append((h % (self.vocab - 12) + 4).astype(np.int32))
                confs.append(((h % 997) / 997.0).astype(np.float32))
            tok = np.concatenate(toks) if toks else np.zeros(0, np.int32)
            if mode == "logits":
                return np.zeros((tok.size, self.vocab), np.float32)
            return tok, np.concatenate(confs) if confs else np.zeros(0, np.float32)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def params_for(mode: str, max_tokens: int, repetition_penalty: float = 1.0):
    from bitdlm import SamplingParams

    base = dict(max_tokens=max_tokens, ignore_eos=True, repetition_penalty=repetition_penalty)
    return {"steps": lambda: SamplingParams(generation_algorithm="steps", steps=16, **base),
            "dual": lambda: SamplingParams(generation_algorithm="steps", steps=16, cache="dual", **base),
            "ar": lambda: SamplingParams(block_length=1, **base),
            "adaptive-ar": lambda: SamplingParams(generation_algorithm="steps", steps=16, decoding_set=False, **base),
            "threshold": lambda: SamplingParams(**base)}[mode]()


def run(llm, core, batch: int, sp, prompt_len: int, vocab: int) -> dict:
    prompts = [prompt_ids(prompt_len, vocab, seed=i) for i in range(batch)]
    eng = llm.engine
    core.seconds, core.calls, core.cpu = 0.0, 0, 0.0
    steps0 = eng.stats.steps
    t0, c0 = time.perf_counter(), time.thread_time()
    gens = llm.generate(prompts, sp)
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return dict(wall=wall, core=core.seconds, calls=core.calls, steps=eng.stats.steps - steps0,
                cpu_outside=cpu - core.cpu,
                tokens=sum(len(g.token_ids) for g in gens),
                outputs=[(g.text, g.finish_reason, *g.token_ids) for g in gens])


def compare(a, argv: list[str]) -> int:
    """Interleaved A/B: the medians over --rounds child runs of each side, and their ratio."""
    import subprocess
    import tempfile

    import bitdlm

    rest, skip = [], False
    for x in argv:  # the child's arguments: everything but --compare / --rounds / --json
        if skip:
            skip = False
        elif x in ("--compare", "--rounds", "--json"):
            skip = True
        elif not x.startswith(("--compare=", "--rounds=", "--json=")):
            rest.append(x)
    sides = {"this": os.path.dirname(os.path.dirname(os.path.abspath(bitdlm.__file__))), "other": a.compare}
    got = {k: {} for k in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                out = os.path.join(tmp, f"{name}{r}.json")
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([sides[name]] + (
                    [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))  # side first
                subprocess.run([sys.executable, os.path.abspath(__file__), *rest, "--json", out], env=env,
                               check=True, stdout=subprocess.DEVNULL)
                with open(out) as f:
                    for row in json.load(f)["rows"]:
                        got[name].setdefault(row["batch"], []).append(row)
    rows = []
    for b in sorted(got["this"]):
        med = {k: statistics.median(x["outside_ms_per_forward"] for x in got[k][b]) for k in sides}
        cpu = {k: statistics.median(x["outside_cpu_ms_per_forward"] for x in got[k][b]) for k in sides}
        core = {k: statistics.median(x["core_ms_per_forward"] for x in got[k][b]) for k in sides}
        low = {k: min(x["outside_ms_per_forward"] for x in got[k][b]) for k in sides}  # (the least loaded run)
        same = {x["outputs_hash"] for k in sides for x in got[k][b]}
        rows.append(dict(batch=b, this_ms=med["this"], other_ms=med["other"], ratio=med["other"] / med["this"],
                         this_min_ms=low["this"], other_min_ms=low["other"],
                         this_cpu_ms=cpu["this"], other_cpu_ms=cpu["other"],
                         this_core_ms=core["this"], other_core_ms=core["other"], same_outputs=len(same) == 1))
        print(f"batch {b:>3}: outside the core per forward {med['this']:7.3f} ms (this) vs {med['other']:7.3f} ms "
              f"(other): {rows[-1]['ratio']:5.2f}x; min {low['this']:.3f} / {low['other']:.3f} ms; "
              f"CPU {cpu['this']:.3f} / {cpu['other']:.3f} ms; "
              f"core {core['this']:.3f} / {core['other']:.3f} ms; "
              f"outputs {'identical' if len(same) == 1 else 'DIFFER'}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(sides=sides, rounds=a.rounds, rows=rows, command=" ".join(sys.argv)), f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bitdlm .bin (default: the shipped tiny model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", default="1,16,64", help="concurrent requests, comma separated")
    ap.add_argument("--mode", default="steps", choices=["steps", "dual", "ar", "threshold", "adaptive-ar"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="!= 1: the penalised logits path (1.000001 decides as 1 does: the same forwards)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="repetitions per batch (the median is reported)")
    ap.add_argument("--fake", action="store_true", help="a no-op forward: only the Python cost is left")
    ap.add_argument("--profile", type=int, default=0, help="cProfile the last batch, print the top N functions")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compare", default=None, metavar="PYTHONPATH",
                    help="A/B: run this benchmark --rounds times in child processes, alternating between "
                         "this bitdlm and the one on PYTHONPATH (e.g. an older checkout's python/)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    if a.compare:
        return compare(a, argv if argv is not None else sys.argv[1:])
    import bitdlm
    from bitdlm.model import default_model_path

    batches = [int(x) for x in a.batch.split(",") if x]
    m = bitdlm.load(a.model or default_model_path(), threads=a.threads)
    core = m._core = FakeCore(m._core, m.vocab_size) if a.fake else CpuTimedCore(m._core)
    llm = bitdlm.LLM(m, max_batch=max(batches), decode_policy="adaptive" if a.mode == "adaptive-ar" else "fixed")
    if a.mode == "adaptive-ar":  # AR at a thousandth of diffusion's price: every request is assigned AR
        from bitdlm.engine import policy

        n = max(batches)
        llm.engine.policy.set_costs(policy.CostCurve([(1, 1e-3), (n, 1e-3)]), policy.CostCurve([(1, 1.0), (n, n)]))
    sp = params_for(a.mode, a.max_tokens, a.repetition_penalty)
    run(llm, core, 1, sp, a.prompt_len, m.vocab_size)  # warm up
    rows = []
    for b in batches:
        reps = [run(llm, core, b, sp, a.prompt_len, m.vocab_size) for _ in range(a.reps)]
        out_ms = [1e3 * (r["wall"] - r["core"]) / r["calls"] for r in reps]
        r = reps[0]
        row = dict(batch=b, mode=a.mode, fake=a.fake, forwards=r["calls"], steps=r["steps"], tokens=r["tokens"],
                   outside_ms_per_forward=statistics.median(out_ms), outside_ms_reps=out_ms,
                   outside_cpu_ms_per_forward=statistics.median(1e3 * x["cpu_outside"] / x["calls"] for x in reps),
                   core_ms_per_forward=statistics.median(1e3 * x["core"] / x["calls"] for x in reps),
                   outputs_hash=zlib.crc32(repr(r["outputs"]).encode()))  # (str hashes vary by process)
        rows.append(row)
        print(f"batch {b:>3} {a.mode:>9}{' fake' if a.fake else ''}: {row['outside_ms_per_forward']:7.3f} ms outside "
              f"the core per forward ({row['outside_cpu_ms_per_forward']:7.3f} ms CPU; "
              f"{row['core_ms_per_forward']:7.3f} in it), {r['calls']} forwards, "
              f"{r['tokens']} tokens, outputs {row['outputs_hash']:08x}", flush=True)
    if a.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        run(llm, core, batches[-1], sp, a.prompt_len, m.vocab_size)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(a.profile)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(model=m.path, threads=m.threads, rows=rows, command=" ".join(sys.argv)), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
