#!/usr/bin/env python3
"""Report for the code default model (issue 13; docs/tiny_model.md, "The code
model"): held-out loss / masked-token accuracy from the training log, and on
held-out function headers, for thresholds 0.5..1.0 with and without the
sub-block cache: tokens per forward and the share of completions that parse;
then wall-clock tokens/s of block diffusion vs autoregressive decoding.

Held-out prompts: functions with a docstring from the held-out modules of
scripts/prepare_code_data.py (never trained on, nor seen by the tokenizer),
dedented so the `def` is at column 0. Prompt = the `def` line(s) + the
docstring, ending right after its closing quotes. The completion (greedy) is
cut at the end of the function: the first non-blank line whose indentation is
<= the def's (column 0); when the token budget ends first, the unfinished last
line is dropped. It counts as parsing when `ast.parse(prompt + completion)`
accepts it and the function's body has a real statement besides the docstring
(`pass` / `...` alone do not count).

    PYTHONPATH=python python3 scripts/code_model_report.py --log /work/wt/ship-data/train_log.json
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import textwrap
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_code_data import HELDOUT_MODULES, STDLIB  # noqa: E402

THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
# Stop strings only save time: each starts a column-0 line, which the cut
# below would remove anyway.
STOPS = ["\ndef ", "\nclass ", "\n@", "\nif __name__"]


def heldout_functions(root: Path = STDLIB, n: int = 48, max_body_tokens: int = 96, tok=None):
    """[(name, prompt)] of n held-out functions (evenly spaced over the sorted
    candidates): a docstring, a real body after it of at most max_body_tokens."""
    cands = []
    for mod in HELDOUT_MODULES:
        path = root / f"{mod}.py"
        if not path.is_file():
            continue
        src = path.read_text(encoding="utf-8")
        lines = src.split("\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(src)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):
                continue
            if not has_real_body(node):
                continue
            head = lines[node.lineno - 1: doc.end_lineno]
            head[-1] = head[-1][: doc.end_col_offset]
            prompt = textwrap.dedent("\n".join(head))
            body = textwrap.dedent("\n".join(lines[doc.end_lineno: node.end_lineno]))
            if tok is not None and len(tok.encode(body)) > max_body_tokens:
                continue
            cands.append((f"{mod}.{node.name}:{node.lineno}", prompt))
    cands.sort()
    if len(cands) <= n:
        return cands
    step = len(cands) / n
    return [cands[int(i * step)] for i in range(n)]


def has_real_body(fn) -> bool:
    rest = fn.body[1:] if (fn.body and isinstance(fn.body[0], ast.Expr)
                           and isinstance(fn.body[0].value, ast.Constant)
                           and isinstance(fn.body[0].value.value, str)) else fn.body
    return any(not isinstance(s, ast.Pass) and not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
               for s in rest)


def cut_function(completion: str, finished_by_length: bool) -> str:
    """The completion up to the end of the function (def at column 0)."""
    lines = completion.split("\n")
    for i, line in enumerate(lines[1:], 1):
        if line.strip() and not line[0].isspace():
            return "\n".join(lines[:i])
    if finished_by_length and len(lines) > 1:
        lines = lines[:-1]  # the budget ended inside this line
    return "\n".join(lines)


def parses_with_body(prompt: str, completion: str, finished_by_length: bool) -> bool:
    code = prompt + cut_function(completion, finished_by_length)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    fns = [s for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return len(fns) == 1 and has_real_body(fns[0])


def repeats(completion: str, times: int = 3) -> bool:
    """Whether some non-blank line of the completion's function comes `times` times or more
    (the model's main failure: `if lo is None: return None` fourteen times)."""
    lines = [ln.strip() for ln in cut_function(completion, True).split("\n") if ln.strip()]
    return any(lines.count(ln) >= times for ln in set(lines))


def sweep(llm, funcs, max_tokens, thresholds, caches, penalties=None):
    """{(cache, threshold): dict(tokens, forwards, parsed, texts)}."""
    import bitdlm

    prompts = [p for _, p in funcs]
    res = {}
    for cache in caches:
        for th in thresholds:
            params = bitdlm.SamplingParams(temperature=0.0, max_tokens=max_tokens, threshold=th,
                                           cache=cache, stop=STOPS, **(penalties or {}))
            t0 = time.time()
            outs = llm.generate(prompts, params)
            ok = [parses_with_body(p, o.text, o.finish_reason == "length") for p, o in zip(prompts, outs)]
            res[(cache, th)] = {"tokens": sum(len(o.token_ids) for o in outs),
                                "forwards": sum(o.stats["forwards"] for o in outs),
                                "parsed": sum(ok), "ok": ok, "texts": [o.text for o in outs],
                                "repeating": sum(repeats(o.text) for o in outs),
                                "seconds": time.time() - t0}
            r = res[(cache, th)]
            print(f"  cache {cache:6s} threshold {th}: {r['tokens']} tokens / {r['forwards']} forwards, "
                  f"{r['parsed']}/{len(prompts)} parse, {r['repeating']} repeat a line 3+ times ({r['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
    return res


def speed(model_path, funcs, threshold, max_tokens, repeats, threads):
    """Median tok/s (one request at a time, ignore_eos so both decode max_tokens)
    of block diffusion at `threshold` and of AR decoding (block size 1)."""
    import bitdlm

    prompts = [p for _, p in funcs]
    out = {}
    for name, bs in (("diffusion", None), ("ar", 1)):
        llm = bitdlm.LLM(model_path, threads=threads, block_size=bs)
        params = bitdlm.SamplingParams(temperature=0.0, max_tokens=max_tokens, threshold=threshold,
                                       ignore_eos=True)
        llm.generate(prompts[0], params)  # warm-up
        rates = []
        for _ in range(repeats):
            toks, secs = 0, 0.0
            for p in prompts:
                t0 = time.perf_counter()
                o = llm.generate(p, params)[0]
                secs += time.perf_counter() - t0
                toks += len(o.token_ids)
            rates.append(toks / secs)
        out[name] = {"median_tok_s": statistics.median(rates), "runs": rates}
        del llm
    return out


def train_seconds(log: dict) -> float:
    """Training time of a log: scripts/train_tiny_dlm.py's `train_time_s`, or the sum of
    scripts/train_dlm_gpu.py's legs (one per device call)."""
    if "train_time_s" in log:
        return log["train_time_s"]
    return sum(leg["seconds"] for leg in log.get("legs", []))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="python/bitdlm/data/tiny-bitdlm.bin")
    p.add_argument("--log", default="build-train/gpu/train_log.json", help="train_log.json of the run")
    p.add_argument("--n", type=int, default=48, help="held-out functions")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="threads of the sweep (a shared machine: 1)")
    p.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    p.add_argument("--speed-threads", default="1,2", help="thread counts of the wall-clock comparison")
    p.add_argument("--speed-prompts", type=int, default=6)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--speed-threshold", type=float, default=None, help="default: the file's")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="the sweep's repetition_penalty (default: 1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="the sweep's (default: 0 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="the sweep's (default: 0 = off)")
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--speed-only", action="store_true", help="only the wall-clock comparison")
    args = p.parse_args(argv)

    import bitdlm

    if Path(args.log).is_file():
        log = json.loads(Path(args.log).read_text())
        for r in log["eval"]:
            print(f"held-out eval step {r['step']}: loss {r['loss']:.3f}, masked-token accuracy {r['masked_acc']:.3f}")
        print(f"trained {log['trained_steps']} steps, {log['trained_tokens'] / 1e6:.1f}M tokens, "
              f"{train_seconds(log) / 60:.1f} min, {log['tokens_per_s'] / 1e3:.0f}k tokens/s on {log['device_name']}")
    llm = bitdlm.LLM(args.bin, threads=args.threads)
    meta = llm.model.meta
    funcs = heldout_functions(n=args.n, tok=llm.tokenizer)
    pen = dict(repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
               frequency_penalty=args.frequency_penalty)
    print(f"{len(funcs)} held-out functions, max {args.max_tokens} new tokens, greedy, {args.threads} threads; "
          f"file default threshold {meta['diffusion']['threshold']}; penalties {pen}")
    t0 = time.time()
    ths = [] if args.speed_only else [float(t) for t in args.thresholds.split(",")]
    res = sweep(llm, funcs, args.max_tokens, ths, ["prefix", "dual"], pen)
    if ths:
        print(f"(sweep {time.time() - t0:.0f} s)\n")
        print("| threshold | tokens/forward (no sub-block cache) | tokens/forward (sub-block cache) "
          "| parse rate (no cache) | parse rate (cache) |\n|---|---|---|---|---|")
    n = len(funcs)
    for th in ths:
        a, b = res[("prefix", th)], res[("dual", th)]
        print(f"| {th} | {a['tokens'] / a['forwards']:.2f} ({a['tokens']}/{a['forwards']}) "
              f"| {b['tokens'] / b['forwards']:.2f} ({b['tokens']}/{b['forwards']}) "
              f"| {100 * a['parsed'] / n:.0f}% ({a['parsed']}/{n}) | {100 * b['parsed'] / n:.0f}% ({b['parsed']}/{n}) |")
    base = res[("prefix", 1.0)]["parsed"] if 1.0 in ths else None
    if base is not None:
        ok = [th for th in ths if 100 * (base - res[("prefix", th)]["parsed"]) / n <= 10]
        print(f"\nlowest threshold within 10 points of threshold 1.0's parse rate (no cache): {min(ok)}")
    for th in (min(ths, default=1.0), 1.0):
        if ("prefix", th) in res:
            print(f"\n### samples, threshold {th}")
            for (name, pr), text, ok in list(zip(funcs, res[("prefix", th)]["texts"], res[("prefix", th)]["ok"]))[:4]:
                print(f"- {name} ({'parses' if ok else 'does not parse'}): {pr + cut_function(text, True)!r}")
    sp_th = args.speed_threshold if args.speed_threshold is not None else meta["diffusion"]["threshold"]
    sps, loads = {}, {}
    for nt in [int(x) for x in args.speed_threads.split(",") if x]:
        load = os.getloadavg()
        sp = sps[nt] = speed(args.bin, funcs[: args.speed_prompts], sp_th, args.max_tokens, args.speed_repeats, nt)
        load2 = loads[nt] = (load, os.getloadavg())[1]
        print(f"\nwall clock, {args.speed_prompts} prompts one at a time, {args.max_tokens} tokens each (ignore_eos), "
              f"{nt} threads, median of {args.speed_repeats}; load average {load[0]:.2f} before, "
              f"{load2[0]:.2f} after")
        for k, v in sp.items():
            print(f"  {k}: {v['median_tok_s']:.1f} tok/s (runs {', '.join(f'{x:.1f}' for x in v['runs'])})")
        print(f"  diffusion / AR: {sp['diffusion']['median_tok_s'] / sp['ar']['median_tok_s']:.2f}x "
              f"(threshold {sp_th})", flush=True)
    sp, load, load2 = sps, None, loads
    if args.json:
        Path(args.json).write_text(json.dumps({
            "functions": [f for f, _ in funcs],
            "sweep": {f"{c}@{t}": {k: v for k, v in r.items()} for (c, t), r in res.items()},
            "speed": sp, "load": load2}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
