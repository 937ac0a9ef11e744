"""`bitdlm generate "PROMPT"`: one prompt through the block-diffusion engine."""
from __future__ import annotations

import sys


def register_cli(subparsers) -> None:
    from ._cpu import threads_arg

    p = subparsers.add_parser("generate", help="generate text for one prompt",
                              description="Generate text for one prompt with Fast-dLLM v2 block diffusion "
                                          "(block size 1: plain autoregressive decoding).")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None, help="model .bin file (default: the packaged default model)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=256, help="generate at most this many tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the positive logits (multiply the negative ones) of every token of the prompt "
                        "and the output so far by this; > 1 discourages repeats (default: 1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this, in [-2, 2], from the logits of tokens generated so far (default: 0 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this, in [-2, 2], times its count so far from a generated token's logit "
                        "(default: 0 = off)")
    p.add_argument("--stop", action="append", default=None, help="stop when the text contains this string (repeatable)")
    p.add_argument("--threshold", type=float, default=None,
                   help="unmask confidence threshold in (0, 1] (default: the model's)")
    p.add_argument("--steps", type=int, default=None,
                   help="LLaDA's fixed-rate rule instead of the threshold: decode each block in this many steps "
                        "(block size / steps tokens per forward, the most confident first)")
    p.add_argument("--small-block-size", type=int, default=None, help="sub-block size (default: the model's)")
    p.add_argument("--block-size", type=int, default=None,
                   help="diffusion block size, 1 = autoregressive (default: the model's)")
    p.add_argument("--use-block-cache", action="store_true", help="sub-block cache (faster, approximate)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past EOS (benchmarking)")
    p.add_argument("--threads", type=threads_arg, default=None,
                   help="OpenMP threads for the forward (default: OMP_NUM_THREADS, else the physical cores)")
    p.add_argument("--stats", action="store_true", help="print forwards, tokens per forward and tok/s to stderr")
    p.add_argument("--stream", action="store_true", help="print text as soon as it is final")
    p.add_argument("--profile", action="store_true",
                   help="print the forward's time per phase (GEMMs, attention, lm_head, ...) to stderr")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from .llm import LLM, SamplingParams

    try:
        llm = LLM(args.model, threads=args.threads, block_size=args.block_size)
        if llm.tokenizer is None:
            raise ValueError("the model file has no tokenizer")
        if args.chat:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            prompt = llm.chat_prompt(msgs + [{"role": "user", "content": args.prompt}])
        else:
            if not args.prompt:
                raise ValueError("empty prompt")
            prompt = llm.tokenizer.encode(args.prompt)
        if args.profile:
            llm.model.set_profile(True)
        if args.steps is not None and args.threshold is not None:
            raise ValueError("--steps and --threshold are two decoding rules: give one")
        rule = dict(generation_algorithm="steps", steps=args.steps) if args.steps is not None else {}
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed, stop=args.stop, threshold=args.threshold,
                                small_block_size=args.small_block_size, use_block_cache=args.use_block_cache,
                                ignore_eos=args.ignore_eos, repetition_penalty=args.repetition_penalty,
                                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                                **rule)
        if args.stream:
            stream = llm.generate_stream(prompt, params)
            for delta in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
            res = llm.last
        else:
            res = llm.generate(prompt, params)[0]
            sys.stdout.write(res.text)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"bitdlm generate: error: {e}", file=sys.stderr)
        return 2
    if args.stats:
        s = res.stats
        n, secs = s["generated_tokens"], s["seconds"] or 0.0
        print(f"prompt tokens: {len(res.prompt_token_ids)}  generated: {n}  finish: {res.finish_reason}\n"
              f"forwards: {s['forwards']}  tokens/forward: {s['tokens_per_forward']:.2f}  "
              f"seconds: {secs:.3f}  tok/s: {n / secs if secs else 0.0:.1f}", file=sys.stderr)
    if llm.model.profiling:  # --profile, or BITDLM_PROFILE=1 at load
        prof = llm.model.profile()
        print_profile(prof, sys.stderr)
        from . import _core

        print_team_profile(_core.team_profile(), prof["calls"], sys.stderr)
    return 0


def print_profile(prof: dict, file) -> None:
    """The phase table of Model.profile(): ms in all, per forward, and share."""
    prof = dict(prof)
    calls = prof.pop("calls") or 1
    total = sum(prof.values()) or 1.0
    print(f"{'phase':14s}{'ms':>10s}{'ms/forward':>12s}{'share':>8s}   ({calls} forwards)", file=file)
    for name, sec in sorted(prof.items(), key=lambda kv: -kv[1]):
        if sec > 0:
            print(f"{name:14s}{1e3 * sec:10.1f}{1e3 * sec / calls:12.2f}{100 * sec / total:7.1f}%", file=file)


def print_team_profile(team: dict, forwards: int, file) -> None:
    """_core.team_profile(): each kind of parallel region's wall time as fork + work (mean
    thread) + imbalance + join, ms per forward (kernels/team_clock.h)."""
    rows = {k: t for k, t in team.items() if t["calls"]}
    if not rows:
        return
    from .model import REGION_PARTS as parts

    n = forwards or 1
    print(f"{'[regions]':14s}{'per fwd':>9s}{'threads':>8s}" + "".join(f"{p:>10s}" for p in parts)
          + "   (ms per forward)", file=file)
    for kind, t in rows.items():
        print(f"{'[' + kind + ']':14s}{t['calls'] / n:9.1f}{t['mean_threads']:8.2f}"
              + "".join(f"{1e3 * t[p] / n:10.3f}" for p in parts), file=file)
