"""The `.bin` format's specification as code: constants, limits, the tensor
table a model's hyperparameters call for, and the checks of the metadata.

Layout (docs/format.md is the specification):

    0   8s   magic  b"BITDLM\\r\\n"
    8   u32  version
    12  u32  crc32 of the header bytes
    16  u64  header length H
    24  H    UTF-8 JSON header (right-padded with spaces)
    ... tensor data, every tensor at a 64-byte aligned absolute offset

The header holds `meta` (hyperparameters, special tokens, diffusion defaults,
chat template, the whole tokenizer JSON) and `tensors` (name, dtype, logical
shape, offset, nbytes, per-tensor scale for ternary tensors, crc32 of the data).
Which tensors: `expected_tensors`; the embedding / lm_head storage rule
(quant.embedding, quant.lm_head, tie_word_embeddings) is `vocab_tensors`.

Also the small value helpers (`is_int`, `finite_float`, `short_repr`) every
checker of untrusted JSON in bitdlm shares. No torch (runtime path).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from ..packing import pad_k

MAGIC = b"BITDLM\r\n"  # \r\n catches text-mode mangling, like PNG's magic
VERSION = 1
ALIGN = 64
PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, header crc32, header length
PREAMBLE_SIZE = PREAMBLE.size  # 24
# The header holds the whole tokenizer JSON (a few MB for 150k vocabularies).
MAX_HEADER_BYTES = 64 << 20

# Bounds on every header value, checked before anything is sized from it (and
# before the C++ side, which takes these as int32, ever sees them). Generous:
# 10x today's largest open models; docs/format.md lists them.
LIMITS = {
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "intermediate_size": 1 << 18,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
}
MAX_PROJ_DIM = 1 << 17            # num_attention_heads * head_dim
MAX_EOS_TOKENS = 256
MAX_BLOCK_SIZE = 4096             # diffusion.block_size
MAX_TOKENIZER_CHARS = 60 << 20    # tokenizer_json
MAX_CHAT_TEMPLATE_CHARS = 1 << 20
MAX_JSON_DEPTH = 32               # nesting of the header JSON (ours is 4 deep)
MAX_NAME_CHARS = 256              # tensor names

# dtype name -> numpy storage dtype
DTYPES = {
    "i2_b128": np.dtype(np.uint8),
    "f16": np.dtype("<f2"),
    "f32": np.dtype("<f4"),
    "i8": np.dtype(np.int8),
}

TERNARY_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

_INT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings")


class ModelFormatError(ValueError):
    """The file is not a valid bitdlm model (missing, truncated, corrupted, foreign)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str            # one of DTYPES
    shape: tuple          # logical shape ([M, K] for i2_b128)
    offset: int           # absolute, 64-byte aligned
    nbytes: int
    scale: float | None   # s_w = 1/mean|W| for i2_b128, else None
    crc32: int | None = None

    @property
    def storage_shape(self) -> tuple:
        return storage_shape(self.dtype, self.shape)


def storage_shape(dtype: str, shape) -> tuple:
    """Shape of the stored array: i2_b128 [M, K] is uint8 [M, pad_k(K)/4]."""
    shape = tuple(int(s) for s in shape)
    if dtype == "i2_b128":
        m, k = shape
        return (m, pad_k(k) // 4)
    return shape


def storage_nbytes(dtype: str, shape) -> int:
    # math.prod on Python ints: no int64 wrap-around for a hostile shape
    return math.prod(storage_shape(dtype, shape)) * DTYPES[dtype].itemsize


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# --------------------------------------------------------------------------- contract

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def finite_float(v):
    """v as a finite float, or None (not a number, bool, inf/NaN, or an int past the float range)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def validate_meta(meta) -> None:
    """Check the metadata keys of docs/architecture.md and the LIMITS; raise ModelFormatError."""
    if not isinstance(meta, dict):
        raise ModelFormatError("metadata is not a JSON object")

    def need(key, types, what):
        if key not in meta:
            raise ModelFormatError(f"metadata key {key!r} is missing")
        v = meta[key]
        if not isinstance(v, types) or (isinstance(v, bool) and types is not bool):
            raise ModelFormatError(f"metadata key {key!r} must be {what}, got {short_repr(v)}")
        return v

    if need("architecture", str, "a string") != "bitnet":
        raise ModelFormatError(f"unsupported architecture {short_repr(meta['architecture'])} (expected 'bitnet')")
    for k in _INT_KEYS:
        v = need(k, int, "a positive integer")
        if not 0 < v <= LIMITS[k]:
            raise ModelFormatError(f"metadata key {k!r} must be an integer in [1, {LIMITS[k]}], got {short_repr(v)}")
    if meta["num_attention_heads"] % meta["num_key_value_heads"]:
        raise ModelFormatError("num_attention_heads must be a multiple of num_key_value_heads")
    if meta["head_dim"] % 2:
        raise ModelFormatError(f"head_dim must be even (RoPE rotates pairs), got {meta['head_dim']}")
    if meta["num_attention_heads"] * meta["head_dim"] > MAX_PROJ_DIM:
        raise ModelFormatError(f"num_attention_heads * head_dim must be <= {MAX_PROJ_DIM}")
    nh, hd, h = meta["num_attention_heads"], meta["head_dim"], meta["hidden_size"]
    if nh * hd != h:  # the one check, for files and for the converter (convert/hf.py validates its meta first)
        raise ModelFormatError(f"num_attention_heads * head_dim = {nh} * {hd} = {nh * hd} must equal hidden_size {h} "
                               f"(BitNet's attn_sub_norm normalizes the attention output with hidden_size weights)")
    # float32 on the C++ side: the values must survive the conversion
    for k, lo, hi in (("rope_theta", 1e-6, 1e15), ("rms_norm_eps", 1e-30, 1.0)):
        need(k, (int, float), "a number")
        v = finite_float(meta[k])
        if v is None or not lo <= v <= hi:
            raise ModelFormatError(f"metadata key {k!r} must be a number in [{lo:g}, {hi:g}], "
                                   f"got {short_repr(meta[k])}")
    need("tie_word_embeddings", bool, "a boolean")
    if need("hidden_act", str, "a string") != "relu2":
        raise ModelFormatError(f"unsupported hidden_act {short_repr(meta['hidden_act'])} (expected 'relu2')")
    quant = need("quant", dict, "an object")
    if quant.get("weights") != "i2_b128":
        raise ModelFormatError(f"unsupported weight quantization {short_repr(quant.get('weights'))}")
    if quant.get("lm_head") not in ("f16", "i8"):
        raise ModelFormatError(f"unsupported lm_head dtype {short_repr(quant.get('lm_head'))}")
    emb = quant.get("embedding", "f16")
    if emb not in ("f16", "i8"):
        raise ModelFormatError(f"unsupported embedding dtype {short_repr(emb)} (expected 'f16' or 'i8')")
    if emb == "i8" and meta["tie_word_embeddings"] and quant["lm_head"] != "i8":
        raise ModelFormatError("quant.embedding 'i8' of a tied model reads the int8 lm_head table: it needs "
                               "quant.lm_head 'i8' (the f16 lm_head of a tied model is the f16 embedding)")
    vocab = meta["vocab_size"]

    def token_id(key, v):
        if not is_int(v) or not 0 <= v < vocab:
            raise ModelFormatError(f"{key} {short_repr(v)} is not a token id in [0, {vocab})")

    for k in ("bos_token_id", "mask_token_id", "pad_token_id"):
        if k not in meta:
            raise ModelFormatError(f"metadata key {k!r} is missing")
        if meta[k] is not None:
            token_id(k, meta[k])
    eos = need("eos_token_ids", list, "a list of token ids")
    if len(eos) > MAX_EOS_TOKENS:
        raise ModelFormatError(f"eos_token_ids has {len(eos)} entries (at most {MAX_EOS_TOKENS})")
    for v in eos:
        token_id("eos_token_ids entry", v)
    diff = need("diffusion", dict, "an object")
    for k in ("block_size", "small_block_size"):
        v = diff.get(k)
        if not is_int(v) or not 0 < v <= MAX_BLOCK_SIZE:
            raise ModelFormatError(f"diffusion.{k} must be an integer in [1, {MAX_BLOCK_SIZE}], got {short_repr(v)}")
    if diff["block_size"] % diff["small_block_size"]:
        raise ModelFormatError("diffusion.block_size must be a multiple of diffusion.small_block_size")
    th = diff.get("threshold")
    if finite_float(th) is None or not 0.0 <= th <= 1.0:
        raise ModelFormatError(f"diffusion.threshold must be in [0, 1], got {short_repr(th)}")
    if not isinstance(diff.get("shift_logits"), bool):
        raise ModelFormatError(f"diffusion.shift_logits must be a boolean, got {short_repr(diff.get('shift_logits'))}")
    if "chat_template" not in meta or not isinstance(meta["chat_template"], (str, type(None))):
        raise ModelFormatError("metadata key 'chat_template' must be a string or null")
    if meta["chat_template"] is not None and len(meta["chat_template"]) > MAX_CHAT_TEMPLATE_CHARS:
        raise ModelFormatError(f"chat_template has {len(meta['chat_template'])} characters "
                               f"(at most {MAX_CHAT_TEMPLATE_CHARS})")
    if not json_depth_ok(meta, MAX_JSON_DEPTH - 1):  # meta sits one level inside the header
        raise ModelFormatError(f"metadata nests deeper than {MAX_JSON_DEPTH - 1} levels")
    tok = need("tokenizer_json", str, "a string (the whole tokenizer.json)")
    if len(tok) > MAX_TOKENIZER_CHARS:
        raise ModelFormatError(f"tokenizer_json has {len(tok)} characters (at most {MAX_TOKENIZER_CHARS})")


def short_repr(v, n: int = 80) -> str:
    """repr of a header value for an error message, cut to n characters (never huge)."""
    if isinstance(v, (dict, list)):
        return f"<{type(v).__name__} of {len(v)}>"
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 200:
        return f"<{v.bit_length()}-bit integer>"  # repr of a huge int is slow (and may be refused)
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def required_bytes(meta) -> int:
    """Bytes the tensors of a file with (validated) `meta` take, computed without listing them."""
    h, i, hd = meta["hidden_size"], meta["intermediate_size"], meta["head_dim"]
    q, kv = meta["num_attention_heads"] * hd, meta["num_key_value_heads"] * hd

    def i2(m, k):
        return m * pad_k(k) // 4

    per_layer = (3 * h + i) * 4 + i2(q, h) + 2 * i2(kv, h) + i2(h, q) + 2 * i2(i, h) + i2(h, i)
    vocab = sum(storage_nbytes(dt, shape) for dt, shape in vocab_tensors(meta).values())
    return meta["num_hidden_layers"] * per_layer + h * 4 + vocab


def embedding_dtype(meta) -> str:
    """quant.embedding of (validated) `meta`: "f16" or "i8" (absent, as in every file
    written before the key existed, means "f16")."""
    return meta["quant"].get("embedding", "f16")


# The vocabulary tables: the token embedding and the lm_head, by quant.embedding,
# quant.lm_head and tie_word_embeddings. This is the one place of the rule
# (docs/format.md "Token embedding and lm_head"); V = vocab_size, H = hidden_size.
#
#   embedding f16   model.embed_tokens.weight f16 [V, H]; row t is read as is.
#   embedding i8    an int8 table with one f32 scale per row; row t of the embedding is
#                   float32(weight[t]) * scale[t], one fp32 multiply per value (the
#                   per-row convention of the int8 lm_head: w ~= q * scale[row]).
#     tied, lm_head i8:  the table IS lm_head.weight i8 [V, H] + lm_head.scale f32 [V]:
#                        one table serves both ends, the file has no model.embed_tokens.*
#     untied:            model.embed_tokens.weight i8 [V, H] + model.embed_tokens.scale f32 [V]
#     tied, lm_head f16: refused by validate_meta: tied means one table, and the f16
#                        lm_head of a tied model IS the f16 embedding (nothing to save)
#   lm_head i8      lm_head.weight i8 [V, H] + lm_head.scale f32 [V] (tied or not; tied: the
#                   embedding quantized)
#   lm_head f16     untied: lm_head.weight f16 [V, H]; tied: reads model.embed_tokens.weight
def vocab_tensors(meta) -> dict:
    """name -> (dtype, shape) of the embedding and lm_head tensors of (validated) `meta`,
    embedding first (the rule above)."""
    v, h = meta["vocab_size"], meta["hidden_size"]
    tied, lm = meta["tie_word_embeddings"], meta["quant"]["lm_head"]
    out = {}
    if embedding_dtype(meta) == "f16":
        out["model.embed_tokens.weight"] = ("f16", (v, h))
    elif not tied:
        out["model.embed_tokens.weight"] = ("i8", (v, h))
        out["model.embed_tokens.scale"] = ("f32", (v,))
    if lm == "i8":
        out["lm_head.weight"] = ("i8", (v, h))
        out["lm_head.scale"] = ("f32", (v,))
    elif not tied:
        out["lm_head.weight"] = ("f16", (v, h))
    return out


def embedding_table(meta) -> tuple:
    """(weight name, scale name or None) the embedding rows of (validated) `meta` are read from."""
    if embedding_dtype(meta) == "f16":
        return "model.embed_tokens.weight", None
    if meta["tie_word_embeddings"]:
        return "lm_head.weight", "lm_head.scale"
    return "model.embed_tokens.weight", "model.embed_tokens.scale"


def expected_tensors(meta) -> dict:
    """name -> (dtype, logical shape) of every tensor a file with `meta` must hold,
    in file order: embedding, final norm, layers, lm_head."""
    h, i = meta["hidden_size"], meta["intermediate_size"]
    hd = meta["head_dim"]
    q, kv = meta["num_attention_heads"] * hd, meta["num_key_value_heads"] * hd
    vocab = vocab_tensors(meta)
    out = {n: spec for n, spec in vocab.items() if n.startswith("model.embed_tokens.")}
    out["model.norm.weight"] = ("f32", (h,))
    ternary = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
               "mlp.down_proj": (h, i)}
    norms = {"input_layernorm": h, "post_attention_layernorm": h,
             "self_attn.attn_sub_norm": h, "mlp.ffn_sub_norm": i}
    for layer in range(meta["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, dim in norms.items():
            out[p + name + ".weight"] = ("f32", (dim,))
        for name in TERNARY_NAMES:
            out[p + name + ".weight"] = ("i2_b128", ternary[name])
    out.update((n, spec) for n, spec in vocab.items() if n.startswith("lm_head."))
    return out


def check_tokenizer(meta):
    """The `tokenizers.Tokenizer` of meta["tokenizer_json"], checked to fit the model
    (at most vocab_size tokens); ModelFormatError otherwise. Not run by a plain
    open (it costs ~0.1 s per MB of tokenizer), only by verify()."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(meta["tokenizer_json"])
    except Exception as e:  # tokenizers raises a bare Exception
        raise ModelFormatError(f"tokenizer_json cannot be loaded by `tokenizers`: {short_repr(str(e), 200)}") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > meta["vocab_size"]:
        raise ModelFormatError(f"the tokenizer has {n} tokens but vocab_size is {meta['vocab_size']}")
    return tok



def json_depth_ok(obj, limit: int) -> bool:
    """True when `obj` nests at most `limit` containers deep (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return False
            stack.extend((c, d + 1) for c in (o.values() if isinstance(o, dict) else o))
    return True

