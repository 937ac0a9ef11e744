#!/usr/bin/env python3
"""Train the ternary block-diffusion LM that bitdlm ships as its default model.

Everything is offline. With `--data DIR` the corpus and tokenizer come from
scripts/prepare_code_data.py (CPython's standard library source, held-out
modules; the GPU run: scripts/train_gpu.sh, `--device cuda --amp bf16`).
Without it the text is CPython's bundled documentation (`pydoc_data.topics`)
plus the docstrings of a fixed list of stdlib modules and the byte-level BPE
tokenizer is trained here with `tokenizers` (the first, CPU-trained model).

Model: transformers' BitNetForCausalLM whose linears are replaced by
`AutoBitLinear` (online quantization): ternary absmean weights and per-token
absmax int8 activations in the forward, straight-through gradients in the
backward (transformers' WeightQuant / ActQuant autograd functions) -- exactly
the quantization bitdlm runs. relu2, RMSNorm, tied embeddings.

Objective (Fast-dLLM v2 / BD3-LM style block diffusion):
- sequences are split into blocks of `block_size` tokens aligned to absolute
  positions; each block draws its own mask ratio t ~ U(0, 1) and masks each
  token with probability t (masked tokens become `<|mask|>`);
- the model input is `[noisy_1 | ... | noisy_k | clean]` (k = 2 with
  complementary masks: the second copy masks exactly what the first keeps);
  all copies share the position ids 0..L-1; a 4D additive float mask lets a
  noisy block b see itself bidirectionally and clean blocks < b, and the clean
  stream is block-causal (block b sees clean blocks <= b);
- token SHIFT (default): the logits at position i-1 predict token i. So the
  first token of a block is never masked in the noisy copies: at inference it
  is already known when the block starts, predicted by the last logits of the
  previous, committed (clean) block. We train exactly that with an extra loss:
  clean position (block start - 1) predicts the block's first token.
  Without shift (--no-shift) logits at i predict token i and every position
  of a block can be masked.
- the loss is the mean cross-entropy over all masked tokens (plus the
  block-start tokens under shift).

Output: an HF-style checkpoint (config.json with the BitNet fields plus
mask_token_id / block_size / small_block_size / shift_logits, bf16
safetensors, tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json, train_log.json) which is then converted with
`bitdlm convert` into the .bin bitdlm ships.

Deterministic for a given seed, thread count and Python version.
Typical run (about 30 min on 2 cores):
    nice -n 10 python3 scripts/train_tiny_dlm.py --out build-train/tiny \
        --bin python/bitdlm/data/tiny-bitdlm.bin
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # transformers' quantizers are torch.compile'd
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import importlib
import inspect
import json
import math
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

EOT = "<|endoftext|>"
MASK = "<|mask|>"

# A tiny chat format so `bitdlm serve` has a template; a share of the training
# documents is wrapped in it ("User: <question>\nAssistant: <doc>").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}" + EOT + "\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# stdlib modules whose docstrings we add to the corpus: importing them has no
# side effects (no antigravity/this/tkinter), the order is fixed for determinism.
DOC_MODULES = """builtins os os.path re json collections itertools functools math random string
textwrap datetime pathlib typing subprocess argparse logging unittest inspect ast dataclasses enum
heapq bisect statistics decimal fractions shutil tempfile glob fnmatch csv io struct hashlib base64
urllib.parse urllib.request http.client http.server email.message socket threading queue asyncio
contextlib copy pickle sqlite3 zipfile tarfile gzip difflib pprint operator abc numbers weakref
types time calendar locale codecs unicodedata xml.etree.ElementTree html configparser traceback
warnings sys array select selectors signal multiprocessing concurrent.futures secrets hmac uuid
ipaddress shlex platform sysconfig importlib zlib bz2 lzma tokenize keyword dis timeit cProfile pdb
doctest graphlib contextvars collections.abc""".split()


# ----------------------------------------------------------------------------- data

def topic_documents() -> list[tuple[str, str]]:
    """(title, text) for every topic of CPython's bundled documentation."""
    import pydoc_data.topics

    docs = []
    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key].strip()
        title = text.splitlines()[0].strip() if text else key
        docs.append((title, text))
    return docs


def docstring_documents(min_len: int = 40) -> list[tuple[str, str]]:
    """(qualified name, docstring) for public members of DOC_MODULES, deduplicated."""
    # dedupe by text only: id() of transient objects (bound methods) gets
    # reused after they are freed, which made the corpus nondeterministic
    seen_doc: set[str] = set()
    docs: list[tuple[str, str]] = []

    def add(name, obj):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            doc = inspect.getdoc(obj)
        if doc and len(doc) >= min_len and doc not in seen_doc:
            seen_doc.add(doc)
            docs.append((name, doc.strip()))

    for modname in DOC_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(modname)
        except Exception:  # a module missing from this build of Python
            continue
        add(modname, mod)
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = getattr(mod, name, None)
            if obj is None or inspect.ismodule(obj):
                continue
            add(f"{modname}.{name}", obj)
            if inspect.isclass(obj):
                for mname in sorted(vars(obj)):
                    if mname.startswith("_"):
                        continue
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        member = getattr(obj, mname, None)
                    if member is not None:
                        add(f"{modname}.{name}.{mname}", member)
    return docs


def build_corpus(seed: int, heldout_every: int, chat_fraction: float):
    """Training / held-out document texts. Held-out = every `heldout_every`-th
    document (deterministic); a `chat_fraction` of documents is wrapped in the
    chat template with a question made from its title."""
    rng = random.Random(seed)
    docs = topic_documents() + docstring_documents()
    train, heldout = [], []
    for i, (title, text) in enumerate(docs):
        if rng.random() < chat_fraction:
            question = rng.choice(["Explain {}.", "What is {}?", "Tell me about {}.", "Describe {}."])
            text = f"User: {question.format(title)}\nAssistant: {text}"
        (heldout if i % heldout_every == heldout_every - 1 else train).append(text)
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_stream(tok, texts: list[str]):
    """One token stream, each document followed by <|endoftext|>; returns the
    stream and the position of every document's preceding EOT (so a sample
    can start like a fresh prompt after an end of text)."""
    import torch

    eot = tok.token_to_id(EOT)
    ids, starts = [eot], []
    for enc in tok.encode_batch(texts):
        starts.append(len(ids) - 1)
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)


def load_prepared(data_dir: Path):
    """The corpus written by scripts/prepare_code_data.py: tokenizer and
    (stream, document starts) for the train and held-out splits."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    if tok.token_to_id(EOT) is None or tok.token_to_id(MASK) is None:
        raise SystemExit(f"{data_dir}/tokenizer.json lacks {EOT} or {MASK}")
    splits = []
    for split in ("train", "heldout"):
        stream = torch.from_numpy(np.load(data_dir / f"{split}_tokens.npy").astype(np.int64))
        starts = torch.from_numpy(np.load(data_dir / f"{split}_docs.npy").astype(np.int64))
        splits.append((stream, starts))
    return tok, splits[0], splits[1]


def sample_batch(stream, starts, batch: int, seq_len: int, gen):
    """Random windows: half start at a document boundary, half anywhere.
    Offsets are drawn on the CPU (reproducible), the gather runs where `stream` lives."""
    import torch

    n = stream.numel() - seq_len - 1
    at_doc = torch.rand(batch, generator=gen) < 0.5
    doc = starts[torch.randint(len(starts), (batch,), generator=gen)].clamp(max=n)
    anywhere = torch.randint(n, (batch,), generator=gen)
    s = to_device(torch.where(at_doc, doc, anywhere), stream.device)
    return stream[s[:, None] + torch.arange(seq_len, device=stream.device)]


def to_device(t, device):
    """`t` (on the CPU) on `device` without waiting for it: a copy from pageable memory to a
    GPU first waits for everything queued on the stream (the last step's kernels: 34 ms a
    step of the GPU trainer's 70 on an H100), one from pinned memory is queued behind them."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------- objective

def block_diffusion_mask(seq_len: int, block: int, copies: int, device=None):
    """4D boolean mask [1, 1, (copies+1)L, (copies+1)L] (True = may attend) over
    [noisy_1 | ... | noisy_copies | clean]: noisy block b sees its own block
    (bidirectional) and clean blocks < b; clean block b sees clean blocks <= b.
    Boolean rather than additive so it needs no cast under bf16 autocast."""
    import torch

    blk = torch.arange(seq_len) // block
    same = blk[:, None] == blk[None, :]
    before = blk[None, :] < blk[:, None]
    upto = blk[None, :] <= blk[:, None]
    n = (copies + 1) * seq_len
    allowed = torch.zeros(n, n, dtype=torch.bool)
    c0 = copies * seq_len
    for c in range(copies):
        r = slice(c * seq_len, (c + 1) * seq_len)
        allowed[r, r] = same
        allowed[r, c0:] = before
    allowed[c0:, c0:] = upto
    return allowed[None, None].to(device)


def make_masks(batch: int, seq_len: int, block: int, shift: bool, complementary: bool, gen):
    """Boolean masks [copies, B, L] with a per-block ratio t ~ U(0,1).
    Under shift the first token of every block is never masked."""
    import torch

    nblk = seq_len // block
    t = torch.rand(batch, nblk, 1, generator=gen).expand(batch, nblk, block).reshape(batch, seq_len)
    m = torch.rand(batch, seq_len, generator=gen) < t
    maskable = torch.ones(seq_len, dtype=torch.bool)
    if shift:
        maskable[::block] = False
    m &= maskable
    masks = [m, (~m) & maskable] if complementary else [m]
    return torch.stack(masks)


def diffusion_loss(model, x, masks, block: int, shift: bool, mask_id: int, attn_mask, reduction="mean"):
    """Cross-entropy on the masked tokens (+ block-start tokens under shift).
    Returns (loss, n_correct_masked, n_masked) -- accuracy counts only masked
    tokens of the noisy copies."""
    import torch
    import torch.nn.functional as F

    copies, B, L = masks.shape
    noisy = [torch.where(masks[c], torch.full_like(x, mask_id), x) for c in range(copies)]
    inp = torch.cat(noisy + [x], dim=1)
    pos = torch.arange(L, device=x.device).repeat(copies + 1)[None].expand(B, -1)
    hidden = model.model(input_ids=inp, attention_mask=attn_mask.expand(B, -1, -1, -1),
                         position_ids=pos).last_hidden_state
    feats, targets = [], []
    for c in range(copies):
        h = hidden[:, c * L : (c + 1) * L]
        m = masks[c]
        if shift:
            # logits at i-1 predict token i (position 0 is never masked under shift)
            feats.append(h[:, :-1][m[:, 1:]])
            targets.append(x[:, 1:][m[:, 1:]])
        else:
            feats.append(h[m])
            targets.append(x[m])
    n_masked = sum(t.numel() for t in targets)
    if shift:  # block-start tokens from the previous clean block's last logits
        hc = hidden[:, copies * L :]
        starts = torch.arange(block, L, block, device=x.device)
        feats.append(hc[:, starts - 1].reshape(-1, hc.shape[-1]))
        targets.append(x[:, starts].reshape(-1))
    feats = torch.cat(feats)
    targets = torch.cat(targets)
    logits = model.lm_head(feats).float()
    loss = F.cross_entropy(logits, targets, reduction=reduction)
    correct = (logits[:n_masked].argmax(-1) == targets[:n_masked]).sum().item()
    return loss, correct, n_masked


# ----------------------------------------------------------------------------- model

def make_config(args, vocab_size: int, eot_id: int):
    """transformers' BitNetConfig of the trained shape (also the fast trainer's)."""
    from transformers import BitNetConfig

    return BitNetConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="relu2",
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=None,  # a padding_idx would freeze the EOT embedding row
        initializer_range=0.02,
        attn_implementation="sdpa",
    )


def build_model(args, vocab_size: int, eot_id: int):
    from transformers import BitNetForCausalLM, BitNetQuantConfig
    from transformers.integrations.bitnet import replace_with_bitnet_linear

    model = BitNetForCausalLM(make_config(args, vocab_size, eot_id))
    state = model.state_dict()
    replace_with_bitnet_linear(
        model,
        modules_to_not_convert=["lm_head"],
        quantization_config=BitNetQuantConfig(linear_class="autobitlinear", quantization_mode="online"),
    )
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # The ternary layers are the only linears converted; check it so a
    # transformers change cannot silently train an unquantized model.
    from transformers.integrations.bitnet import AutoBitLinear

    n_bit = sum(isinstance(m, AutoBitLinear) and m.online_quant for m in model.modules())
    assert n_bit == 7 * args.layers, n_bit
    return model.float()


def check_ste(model):
    """The quantizers must pass gradients straight through (not zero them)."""
    import torch
    from transformers.integrations.bitnet import ActQuant, WeightQuant

    w = torch.randn(8, 16, requires_grad=True)
    a = torch.randn(3, 16, requires_grad=True)
    (WeightQuant.apply(w) * torch.arange(16.0)).sum().backward()
    (ActQuant.apply(a) * torch.arange(16.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(16.0).expand(8, 16)), "WeightQuant is not an STE"
    assert torch.equal(a.grad, torch.arange(16.0).expand(3, 16)), "ActQuant is not an STE"


# ----------------------------------------------------------------------------- save / eval

def save_checkpoint(model, tok, args, out: Path, log: dict):
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    eot = tok.token_to_id(EOT)
    mask = tok.token_to_id(MASK)
    cfg = model.config.to_dict()
    for k in ("quantization_config", "_attn_implementation_autoset", "attn_implementation", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    cfg.update(
        architectures=["BitNetForCausalLM"],
        model_type="bitnet",
        dtype="bfloat16",
        pad_token_id=eot,
        # master weights: transformers quantizes them on the fly (like the -bf16 BitNet repo)
        quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear",
                             "quantization_mode": "online"},
        # block diffusion fields (Fast-dLLM v2 calls the block size bd_size)
        mask_token_id=mask,
        block_size=args.block_size,
        bd_size=args.block_size,
        small_block_size=args.small_block_size,
        shift_logits=not args.no_shift,
        threshold=0.9,
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "mask_token": MASK,
        "unk_token": None, "model_max_length": args.max_positions,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "mask_token": MASK}, indent=2) + "\n")
    gen = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "mask_token_id": mask,
           "block_size": args.block_size, "small_block_size": args.small_block_size, "threshold": 0.9}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


def evaluate(model, batches, block, shift, mask_id, attn_mask, amp):
    """Held-out masked-token accuracy and loss on fixed batches (fixed masks)."""
    import torch

    model.eval()
    tot_loss, tot_n, tot_c, tot_m = 0.0, 0, 0, 0
    with torch.no_grad(), amp():
        for x, masks in batches:
            loss, c, m = diffusion_loss(model, x, masks, block, shift, mask_id, attn_mask, reduction="sum")
            n_targets = m + (x.shape[0] * (x.shape[1] // block - 1) if shift else 0)
            tot_loss += loss.item()
            tot_n += n_targets
            tot_c += c
            tot_m += m
    model.train()
    return tot_loss / tot_n, tot_c / max(tot_m, 1)


# ----------------------------------------------------------------------------- main

def build_parser(description=__doc__):
    """The options shared with scripts/train_dlm_gpu.py (which adds its own)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build-train/tiny", help="HF checkpoint directory")
    p.add_argument("--bin", default=None, help="convert the checkpoint to this .bin with `bitdlm convert`")
    p.add_argument("--data", default=None,
                   help="corpus folder written by scripts/prepare_code_data.py (tokenizer + token "
                        "streams); without it the documentation corpus is built and tokenized here")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", choices=["bf16", "none"], default="none",
                   help="bf16 autocast (f32 master weights); the GPU run uses bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default=None,
                   help="continue from a checkpoint written by this script (same tokenizer/shapes); "
                        "its train_log.json is kept in the new log as 'init_log'")
    p.add_argument("--threads", type=int, default=1,
                   help="1 is fastest on a shared machine: OpenMP barriers stall when a core is taken")
    p.add_argument("--vocab", type=int, default=3072, help="tokenizer size (ignored with --data)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=640)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--small-block-size", type=int, default=8)
    p.add_argument("--no-shift", action="store_true", help="logits at i predict token i")
    p.add_argument("--complementary", action="store_true",
                   help="two noisy copies with complementary masks (1.5x the compute per step)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=None,
                   help="split each batch into micro-batches (gradient accumulation); halved "
                        "automatically if the first step runs out of GPU memory")
    p.add_argument("--steps", type=int, default=500,
                   help="schedule length; with --time-budget-min the cosine follows whichever "
                        "of steps or time runs out first")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop (and save) after this many minutes of the whole run (data loading "
                        "included); breaks determinism if hit")
    p.add_argument("--save-every-min", type=float, default=None,
                   help="also save the checkpoint every this many minutes (a fallback if the run dies)")
    p.add_argument("--no-save", action="store_true", help="sanity run: train, report, save nothing")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=6)
    p.add_argument("--heldout-every", type=int, default=20)
    p.add_argument("--chat-fraction", type=float, default=0.3)
    p.add_argument("--log-json", default=None, help="also write the training log here")
    return p


def check_args(p, args):
    if args.seq_len % args.block_size or args.block_size % args.small_block_size:
        p.error("seq-len must be a multiple of block-size, block-size of small-block-size")
    if args.micro_batch is not None and (args.micro_batch < 1 or args.batch % args.micro_batch):
        p.error("--micro-batch must divide --batch")
    return args


def parse_args(argv=None):
    p = build_parser()
    return check_args(p, p.parse_args(argv))


def _write_log(log: dict, args, out: Path | None):
    text = json.dumps(log, indent=1) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_log.json").write_text(text)
    if args.log_json:
        Path(args.log_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.log_json).write_text(text)


def main(argv=None):
    args = parse_args(argv)
    import contextlib

    import torch
    from tqdm import tqdm

    t0 = time.time()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    shift = not args.no_shift

    def amp():
        if args.amp == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if args.data:
        tok, (train_stream, train_starts), (held_stream, held_starts) = load_prepared(Path(args.data))
        n_train_docs, n_held_docs = len(train_starts), len(held_starts)
    else:
        train_docs, heldout_docs = build_corpus(args.seed, args.heldout_every, args.chat_fraction)
        tok = train_tokenizer(train_docs, args.vocab)
        train_stream, train_starts = encode_stream(tok, train_docs)
        held_stream, held_starts = encode_stream(tok, heldout_docs)
        n_train_docs, n_held_docs = len(train_docs), len(heldout_docs)
    eot, mask_id = tok.token_to_id(EOT), tok.token_to_id(MASK)
    print(f"corpus: {n_train_docs} train docs ({train_stream.numel()} tokens), "
          f"{n_held_docs} held-out docs ({held_stream.numel()} tokens), vocab {tok.get_vocab_size()}",
          flush=True)
    if held_stream.numel() <= args.seq_len + 1 or train_stream.numel() <= args.seq_len + 1:
        raise SystemExit(f"corpus too small for --seq-len {args.seq_len}")

    model = build_model(args, tok.get_vocab_size(), eot)
    check_ste(model)
    init_log = None
    if args.init_from:
        from safetensors.torch import load_file

        src = Path(args.init_from)
        if (src / "tokenizer.json").read_text() != tok.to_str(pretty=True) and \
                json.loads((src / "tokenizer.json").read_text()) != json.loads(tok.to_str()):
            raise SystemExit(f"{src}: its tokenizer differs from the one this run uses")
        state = {k: v.float() for k, v in load_file(str(src / "model.safetensors")).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise SystemExit(f"{src}: checkpoint does not match the model ({missing}, {unexpected})")
        model.tie_weights()
        init_log = json.loads((src / "train_log.json").read_text())
        print(f"initialised from {src}", flush=True)
    model.to(device)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n_params = sum(p.numel() for p in model.parameters())
    n_ternary = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "AutoBitLinear")
    print(f"model: {n_params / 1e6:.2f}M parameters ({n_ternary / 1e6:.2f}M ternary) on {device}, "
          f"amp {args.amp}", flush=True)

    train_stream, held_stream = train_stream.to(device), held_stream.to(device)
    copies = 2 if args.complementary else 1
    attn_mask = block_diffusion_mask(args.seq_len, args.block_size, copies, device)
    eval_mask = block_diffusion_mask(args.seq_len, args.block_size, 1, device)
    egen = torch.Generator().manual_seed(args.seed + 1)
    eval_batches = []
    eval_bs = args.micro_batch or args.batch
    for _ in range(args.eval_batches):
        x = sample_batch(held_stream, held_starts, eval_bs, args.seq_len, egen)
        m = make_masks(eval_bs, args.seq_len, args.block_size, shift, False, egen)
        eval_batches.append((x, m.to(device)))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)

    budget_s = 60 * args.time_budget_min if args.time_budget_min else None

    def progress(step):
        """Schedule position in [0, 1]: steps or time, whichever is further."""
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        if budget_s:
            frac = max(frac, (time.time() - t0) / budget_s)
        return min(max(frac, 0.0), 1.0)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = progress(step)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    out = None if args.no_save else Path(args.out)
    gen = torch.Generator().manual_seed(args.seed)
    log = {"args": vars(args), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "params": n_params, "ternary_params": n_ternary,
           "corpus_tokens": {"train": train_stream.numel(), "heldout": held_stream.numel()},
           "steps": [], "loss": [], "lr": [], "time_s": [], "eval": [], "skipped_steps": [],
           "init_log": init_log}

    def save(tag):
        if out is None:
            return
        ts = time.time()
        save_checkpoint(model, tok, args, out, log)
        _write_log(log, args, out)
        print(f"saved checkpoint ({tag}) to {out} in {time.time() - ts:.1f}s", flush=True)

    def run_eval(step):
        el, acc = evaluate(model, eval_batches, args.block_size, shift, mask_id, eval_mask, amp)
        log["eval"].append({"step": step, "loss": el, "masked_acc": acc, "time_s": time.time() - t0})
        return el, acc

    def train_step(x, masks, micro):
        """One optimizer step over `x` in micro-batches of `micro`; returns (loss, grad norm)."""
        opt.zero_grad(set_to_none=True)
        total = 0.0
        n_micro = x.shape[0] // micro
        for i in range(n_micro):
            sl = slice(i * micro, (i + 1) * micro)
            with amp():
                loss, _, _ = diffusion_loss(model, x[sl], masks[:, sl], args.block_size, shift,
                                            mask_id, attn_mask)
            (loss / n_micro).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return total / n_micro, norm

    model.train()
    micro = args.micro_batch or args.batch
    tokens_per_step = args.batch * args.seq_len
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True, mininterval=5.0,
               disable=not sys.stderr.isatty())
    ema, last_save, t_train, bad_run = None, time.time(), None, 0
    step = -1
    for step in bar:
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_batch(train_stream, train_starts, args.batch, args.seq_len, gen)
        masks = make_masks(args.batch, args.seq_len, args.block_size, shift, copies == 2, gen).to(device)
        while True:
            try:
                loss, norm = train_step(x, masks, micro)
                break
            except torch.OutOfMemoryError:
                if step > 0 or micro == 1:
                    raise
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                micro //= 2
                while args.batch % micro:
                    micro -= 1
                print(f"out of memory at the first step: micro-batch -> {micro}", flush=True)
        val, norm = loss.item(), norm.item()
        if not (math.isfinite(val) and math.isfinite(norm)):
            # never apply a non-finite update: skip it, give up after 20 in a row
            opt.zero_grad(set_to_none=True)
            log["skipped_steps"].append(step)
            bad_run += 1
            print(f"step {step + 1}: non-finite loss {val} / grad norm {norm}: update skipped", flush=True)
            if bad_run >= 20:
                log["stopped_early_at_step"] = step + 1
                log["failure"] = "20 non-finite steps in a row"
                break
            continue
        bad_run = 0
        opt.step()
        if step == 0:
            t_train = time.time()  # throughput excludes the first (warm-up) step
        ema = val if ema is None else 0.95 * ema + 0.05 * val
        log["steps"].append(step)
        log["loss"].append(val)
        log["lr"].append(lr)
        log["time_s"].append(time.time() - t0)
        if (step + 1) % 50 == 0 or step < 3:
            el_s = time.time() - t_train if t_train and step > 0 else None
            tps = f"{tokens_per_step * step / el_s:,.0f} tokens/s" if el_s else "-"
            print(f"step {step + 1}: loss {val:.4f} (ema {ema:.4f}) lr {lr:.2e} |g| {norm:.2f} "
                  f"{tps} ({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            el, acc = run_eval(step + 1)
            print(f"step {step + 1}: held-out loss {el:.4f}  masked-token acc {acc:.4f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if args.save_every_min and time.time() - last_save > 60 * args.save_every_min:
            save(f"step {step + 1}")
            last_save = time.time()
        if budget_s and time.time() - t0 > budget_s and step + 1 < args.steps:
            log["stopped_early_at_step"] = step + 1
            print(f"time budget hit at step {step + 1}", flush=True)
            break
    n_done = len(log["steps"])
    if t_train and n_done > 1:
        log["tokens_per_s"] = tokens_per_step * (n_done - 1) / (time.time() - t_train)
        print(f"throughput: {log['tokens_per_s']:,.0f} training tokens/s "
              f"({log['tokens_per_s'] * (copies + 1):,.0f} positions/s), micro-batch {micro}", flush=True)
    log["micro_batch"] = micro
    log["train_time_s"] = time.time() - t0
    log["trained_steps"] = n_done
    log["trained_tokens"] = n_done * tokens_per_step
    if not log["loss"]:
        raise SystemExit("no finite training step")
    if args.no_save:
        _write_log(log, args, None)
        if log["skipped_steps"]:
            raise SystemExit(f"sanity run: non-finite loss at steps {log['skipped_steps']}")
        print(f"sanity run: {n_done} steps, last loss {log['loss'][-1]:.4f}", flush=True)
        return 0
    # save first: a failure in the evaluation must not lose the weights
    save("final")
    el, acc = run_eval(n_done)
    log["final_eval"] = log["eval"][-1]
    print(f"final held-out loss {el:.4f}  masked-token acc {acc:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    _write_log(log, args, out)
    if args.bin:
        cmd = [sys.executable, "-m", "bitdlm.cli", "convert", str(out), args.bin, "--force", "--quiet"]
        print("+", " ".join(cmd), flush=True)
        env = dict(os.environ)
        pkg = str(Path(__file__).resolve().parent.parent / "python")
        env["PYTHONPATH"] = pkg + os.pathsep + env.get("PYTHONPATH", "")
        subprocess.run(cmd, check=True, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
