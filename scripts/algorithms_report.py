#!/usr/bin/env python3
"""Tokens per forward of every decoding algorithm and cache strategy (bitdlm.decoding)
on a model (default: the packaged default model), as a markdown table.

    python scripts/algorithms_report.py [--model M.bin] [--max-tokens 96] [--threads 2]

Each prompt is decoded alone (batch 1, greedy, EOS ignored so every run makes the
same number of tokens), so `forwards` counts forward calls. `same as AR` is the
share of tokens equal to one-token-per-step decoding (threshold 1.0, prefix
cache): how far parallel unmasking moved the greedy output.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

PROMPTS = [
    'The "for" statement',
    "User: What is a list?\nAssistant:",
    "def add(a, b):",
    "Return a new list",
    "User: How do I read a file?\nAssistant:",
    "A class is",
]

RUNS = [  # (algorithm, its parameters, cache)
    ("threshold", dict(threshold=1.0), "prefix"),
    ("threshold", {}, "none"),
    ("threshold", {}, "prefix"),
    ("threshold", {}, "dual"),
    ("threshold", dict(threshold=0.7), "prefix"),
    ("factor", {}, "none"),
    ("factor", {}, "prefix"),
    ("factor", {}, "dual"),
    ("factor", dict(factor=2.0), "prefix"),
    ("credit", {}, "none"),
    ("credit", {}, "prefix"),
    ("credit", {}, "dual"),
    ("credit", dict(threshold=0.7), "prefix"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a .bin (default: $BITDLM_MODEL or the packaged model)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import bitdlm
    from bitdlm.model import default_model_path

    path = args.model or default_model_path()
    llm = bitdlm.LLM(path, threads=args.threads)
    tok = llm.tokenizer
    d = llm.model.meta["diffusion"]
    prompts = [tok.encode(p) for p in PROMPTS]

    def run(algorithm, kw, cache):
        sp = bitdlm.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, generation_algorithm=algorithm,
                                   cache=cache, **kw)
        outs, t0 = [], time.perf_counter()
        for p in prompts:
            outs.append(llm.generate(p, sp)[0])
        return outs, time.perf_counter() - t0

    base, _ = run("threshold", dict(threshold=1.0), "prefix")
    print(f"model: {os.path.basename(str(path))} (block {d['block_size']}, sub-block {d['small_block_size']}, "
          f"default threshold {d.get('threshold', 0.9)}); {len(prompts)} prompts x {args.max_tokens} tokens, "
          f"greedy, batch 1, {llm.model.threads} threads\n")
    print("| algorithm | parameters | cache | forwards | tokens/forward | tok/s | same as AR |")
    print("|---|---|---|---:|---:|---:|---:|")
    for algorithm, kw, cache in RUNS:
        outs, dt = run(algorithm, kw, cache)
        fw = sum(o.stats["forwards"] for o in outs)
        n = sum(len(o.token_ids) for o in outs)
        same = sum(sum(a == b for a, b in zip(o.token_ids, b0.token_ids)) for o, b0 in zip(outs, base))
        params = ", ".join(f"{k}={v}" for k, v in kw.items()) or "defaults"
        print(f"| {algorithm} | {params} | {cache} | {fw} | {n / fw:.2f} | {n / dt:.0f} | {100 * same / n:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
