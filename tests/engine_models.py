"""The tiny sharpened block-diffusion models of the engine tests (shared by
test_engine.py and test_algorithms.py through conftest.py's `models` fixture):
a random BitNet checkpoint made confident enough that thresholds < 1 unmask
several tokens per step, converted to a .bin, and a counting model backend."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hf_models import MASK_ID, make_hf_model

BS, SBS = 8, 4


class Counting:
    """bitdlm.load's Model (f32 KV: exact against the fp32 oracle) that counts
    forward calls, tokens per item and live caches; meta overrides for tests."""

    def __init__(self, path, **meta_over):
        import bitdlm

        self.model = bitdlm.load(str(path), threads=1, kv_dtype="f32")
        self.meta = dict(self.model.meta, **meta_over)
        self.tokenizer = self.model.tokenizer
        self.calls, self.token_counts, self.kv = [], [], {}

    def alloc_seq(self, capacity):
        sid = self.model.alloc_seq(capacity)
        self.kv[sid] = capacity
        return sid

    def free_seq(self, sid):
        self.model.free_seq(sid)
        del self.kv[sid]

    def forward(self, items, *args, **kw):
        self.calls.append(len(items))
        self.token_counts += [len(it[1]) for it in items]
        return self.model.forward(items, *args, **kw)


@dataclass
class Tiny:
    hf: object  # transformers' quantized BitNet (the oracle)
    meta: dict
    path: object  # the converted .bin


def sharpened_checkpoint(tmp, shift, seed):
    """A tiny random checkpoint (tests/hf_models.py) made confident enough that
    thresholds < 1 unmask several tokens per step: large embeddings and a larger
    final norm (random weights otherwise give near-uniform confidences)."""
    from safetensors.numpy import load_file, save_file

    hf_dir = make_hf_model(tmp / "hf", seed=seed, initializer_range=0.3, max_position_embeddings=96,
                           extra_config=dict(mask_token_id=MASK_ID, bd_size=BS, small_block_size=SBS,
                                             shift_logits=shift))
    st = hf_dir / "model.safetensors"
    sd = load_file(str(st))
    sd["model.norm.weight"] = sd["model.norm.weight"] * np.float32(5.0)
    # the .bin stores the (tied) embedding in f16: give the oracle the very same values
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].astype(np.float16).astype(np.float32)
    save_file(sd, str(st), metadata={"format": "pt"})
    return hf_dir


def backend(m: Tiny, **meta_over):
    return Counting(m.path, **meta_over)


def prompt_ids(n, seed=0):
    return np.random.default_rng(seed).integers(4, 320, n).tolist()  # no special tokens
