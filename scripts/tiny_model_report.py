#!/usr/bin/env python3
"""Report for the tiny default model (docs/tiny_model.md): loss-curve PNG,
held-out masked-token accuracy (from train_log.json), and for confidence
thresholds 0.5..1.0 the tokens per forward and sample outputs.

Decoding runs on bitdlm (`--engine bitdlm`, the .bin through `bitdlm.LLM`) or
on a small torch Fast-dLLM v2 decoder over the HF checkpoint (`--engine torch`,
transformers' BitNet with online quantization is the oracle).

    python3 scripts/tiny_model_report.py --ckpt build-train/tiny \
        --bin python/bitdlm/data/tiny-bitdlm.bin --engine bitdlm --out docs
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import argparse
import json
import sys
import time
from pathlib import Path

PROMPTS = [
    "The \"for\" statement",
    "The \"assert\" statement",
    "Return a new list",
    "User: What is a class?\nAssistant:",
    "The \"import\" statement",
    "Raise",
]
THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


# ----------------------------------------------------------------------------- torch decoder

def block_causal_mask(n_q: int, q_start: int, n_kv: int, block: int, dtype):
    """Additive [1,1,n_q,n_kv] mask: query at absolute position p sees key q
    iff q // block <= p // block (keys start at absolute position 0)."""
    import torch

    qb = (torch.arange(n_q) + q_start) // block
    kb = torch.arange(n_kv) // block
    m = torch.zeros(n_q, n_kv, dtype=dtype)
    m.masked_fill_(kb[None, :] > qb[:, None], torch.finfo(dtype).min)
    return m[None, None]


def torch_generate(model, prompt_ids, max_new_tokens, block, small, threshold, mask_id, eos_ids,
                   shift=True):
    """Greedy Fast-dLLM v2 decoding (no sub-block cache). Returns
    (generated ids, forwards). Forwards count every model call (the prefill,
    denoising steps, block commits), like bitdlm's per-request stats."""
    import torch
    from transformers import DynamicCache

    ids = list(prompt_ids)
    n_prompt = len(ids)
    cache = DynamicCache(config=model.config)
    forwards = 0
    n_done = (n_prompt // block) * block  # committed (cached) tokens
    next_first = None  # first token of the next block, from the commit's last logits (shift)

    def run(tokens, start, write):
        x = torch.tensor([tokens])
        pos = torch.arange(start, start + len(tokens))[None]
        mask = block_causal_mask(len(tokens), start, start + len(tokens), block, torch.float32)
        out = model(input_ids=x, position_ids=pos, attention_mask=mask, past_key_values=cache,
                    use_cache=True)
        if not write:
            cache.crop(-len(tokens))  # negative = number of tokens to drop
        return out.logits[0].float()

    with torch.no_grad():
        if n_done:
            logits = run(ids[:n_done], 0, True)
            forwards += 1
            if shift and n_done == n_prompt:
                next_first = int(logits[-1].argmax())
        finished = False
        while not finished and len(ids) - n_prompt < max_new_tokens:
            start = n_done
            cur = ids[start:] + [mask_id] * (block - (len(ids) - start))
            known = len(ids) - start  # prompt remainder
            if next_first is not None and known == 0:
                cur[0] = next_first
                known = 1
            masked = [i for i in range(block) if cur[i] == mask_id and i >= known]
            for sb in range(0, block, small):
                while True:
                    todo = [i for i in masked if sb <= i < sb + small and cur[i] == mask_id]
                    if not todo:
                        break
                    logits = run(cur, start, False)
                    forwards += 1
                    src = [i - 1 for i in todo] if shift else todo
                    probs = torch.softmax(logits[src], -1)
                    probs[:, mask_id] = 0  # never produce the mask token
                    conf, tok = probs.max(-1)
                    best = int(conf.argmax())
                    for j, i in enumerate(todo):
                        if conf[j] > threshold or j == best:
                            cur[i] = int(tok[j])
                # stop once an EOS is final and nothing before it is masked
                eos_at = [i for i in range(known, block) if cur[i] in eos_ids]
                if eos_at and all(cur[i] != mask_id for i in range(eos_at[0])):
                    cur = cur[: eos_at[0] + 1]
                    finished = True
                    break
            ids = ids[:start] + cur
            if finished:
                break
            logits = run(cur, start, True)  # commit the block's K/V
            forwards += 1
            n_done = start + block
            next_first = int(logits[-1].argmax()) if shift else None
    gen = ids[n_prompt:][:max_new_tokens]
    return gen, forwards


def load_torch_model(ckpt):
    import torch
    from transformers import BitNetForCausalLM

    torch.set_num_threads(1)
    return BitNetForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- report

def _stages(log):
    """[(log, step offset)] from the first stage to `log` (logs chain via init_log)."""
    chain = []
    while log is not None:
        chain.append(log)
        log = log.get("init_log")
    chain.reverse()
    out, off = [], 0
    for lg in chain:
        out.append((lg, off))
        off += len(lg["steps"])
    return out


def plot_loss(log, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax2 = ax.twinx()
    for i, (lg, off) in enumerate(_stages(log)):
        steps = [s + off for s in lg["steps"]]
        ema, e = [], None
        for v in lg["loss"]:
            e = v if e is None else 0.95 * e + 0.05 * v
            ema.append(e)
        first = i == 0
        ax.plot(steps, lg["loss"], color="0.8", lw=0.6, label="train loss (per step)" if first else None)
        ax.plot(steps, ema, color="C0", label="train loss (EMA 0.95)" if first else None)
        ev = lg["eval"]
        ax.plot([r["step"] + off for r in ev], [r["loss"] for r in ev], "o-", color="C1",
                label="held-out loss" if first else None)
        ax2.plot([r["step"] + off for r in ev], [r["masked_acc"] for r in ev], "s--", color="C2",
                 label="held-out masked-token acc" if first else None)
        if off:
            ax.axvline(off, color="k", lw=0.8, ls=":")
            lo, hi = ax.get_ylim()  # stagger the labels: stages can be close together
            ax.text(off, hi - (i % 3) * 0.06 * (hi - lo), f" stage {i + 1}: seq {lg['args']['seq_len']}, "
                    f"lr {lg['args']['lr']:g}", va="top", fontsize=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats, masked tokens)")
    ax2.set_ylabel("masked-token accuracy")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax.set_title("tiny-bitdlm: block-diffusion training (ternary weights, int8 activations)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def decode_all(args, thresholds):
    """{threshold: (tokens, forwards, [texts])} over PROMPTS."""
    res = {}
    if args.engine == "bitdlm":
        import bitdlm

        llm = bitdlm.LLM(args.bin, threads=args.threads)
        for th in thresholds:
            params = bitdlm.SamplingParams(temperature=0.0, max_tokens=args.max_tokens, threshold=th)
            outs = llm.generate(PROMPTS, params)
            toks = sum(len(o.token_ids) for o in outs)
            fwd = sum(o.stats["forwards"] for o in outs)
            res[th] = (toks, fwd, [o.text for o in outs])
        return res
    from tokenizers import Tokenizer

    cfg = json.loads((Path(args.ckpt) / "config.json").read_text())
    tok = Tokenizer.from_file(str(Path(args.ckpt) / "tokenizer.json"))
    model = load_torch_model(args.ckpt)
    eos = [cfg["eos_token_id"]]
    for th in thresholds:
        toks = fwd = 0
        texts = []
        for p in PROMPTS:
            gen, f = torch_generate(model, tok.encode(p).ids, args.max_tokens, cfg["block_size"],
                                    cfg["small_block_size"], th, cfg["mask_token_id"], eos,
                                    cfg.get("shift_logits", True))
            toks += len(gen)
            fwd += f
            texts.append(tok.decode([t for t in gen if t not in eos]))
        res[th] = (toks, fwd, texts)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="build-train/tiny")
    p.add_argument("--bin", default="python/bitdlm/data/tiny-bitdlm.bin")
    p.add_argument("--engine", choices=["bitdlm", "torch"], default="bitdlm")
    p.add_argument("--out", default="docs")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    args = p.parse_args(argv)

    log = json.loads((Path(args.ckpt) / "train_log.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(log, out / "tiny_model_loss.png")
    for i, (lg, off) in enumerate(_stages(log)):
        r = lg["eval"][-1]
        print(f"stage {i + 1}: {len(lg['steps'])} steps, seq {lg['args']['seq_len']}, batch "
              f"{lg['args']['batch']}, lr {lg['args']['lr']}, {lg['train_time_s'] / 60:.1f} min; held-out "
              f"loss {r['loss']:.3f}, masked-token accuracy {r['masked_acc']:.3f}")
    t0 = time.time()
    res = decode_all(args, [float(t) for t in args.thresholds.split(",")])
    print(f"engine {args.engine}, {len(PROMPTS)} prompts, max_tokens {args.max_tokens}, "
          f"greedy ({time.time() - t0:.0f} s)")
    print("| threshold | tokens | forwards | tokens/forward |\n|---|---|---|---|")
    for th, (toks, fwd, _) in res.items():
        tpf = f"{toks / fwd:.2f}" if fwd else "n/a"
        print(f"| {th} | {toks} | {fwd} | {tpf} |")
    for th, (_, _, texts) in res.items():
        print(f"\n### threshold {th}")
        for prompt, text in zip(PROMPTS, texts):
            print(f"- `{prompt!r}` -> {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
