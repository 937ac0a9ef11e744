"""Import a llama.cpp GGUF BitNet model (`general.architecture` "bitnet") with TQ1_0 /
TQ2_0 ternary weights into a bitdlm `.bin` (needs the `gguf` package).

TQ1_0 / TQ2_0 store every 256 weights as ternary codes plus one f16 scale d = max|w|
of the block (ggml-quants; gguf.quants reads them). A BitNet b1.58 export writes w =
codes / s_w, so every block holding a nonzero code has the same d = 1/s_w: that is
checked, and the codes come back exactly. The "bitnet" architecture keeps Hugging
Face's rotate-half RoPE order (llama.cpp runs it as NEOX), so Q/K need no un-permuting.
The tokenizer is rebuilt from `tokenizer.ggml.*` (byte-level BPE, "gpt2" model) and the
chat template from `tokenizer.chat_template`; `--tokenizer DIR` uses a folder's
tokenizer.json instead. bitnet.cpp's I2_S / TL1 / TL2 types are not documented
outside its kernels and are refused with a one-line error.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..format import short_repr
from .checkpoint import TensorSource
from .common import ConversionError
from .hf import build, check_options
from .tensors import scale_name

# GGUF tensor name (blk.N. prefix removed) -> Hugging Face BitNet name
_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_sub_norm": "self_attn.attn_sub_norm", "ffn_sub_norm": "mlp.ffn_sub_norm"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
# GPT-2's and Llama 3's pre-tokenizer splits (tokenizer.ggml.pre), as llama.cpp names them
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _NAMES:
        return f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.weight"
    return None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


class GGUFFile(TensorSource):
    """A GGUF file's tensors by Hugging Face name: TQ1_0 / TQ2_0 weights read as their
    ternary values (f32) with a `weight_scale` 1/d (the bitlinear convention)."""

    def __init__(self, reader, path: Path):
        import gguf

        self.path = path
        self._q = gguf.GGMLQuantizationType
        self.tensors = {}
        for t in reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise ConversionError(f"{path}: unexpected tensor {short_repr(t.name)} for a BitNet model")
            self.tensors[name] = t
        self._codes = {}  # ternary name -> (codes int8 [M, K], s_w)

    def names(self):
        return list(self.tensors) + [scale_name(n) for n, t in self.tensors.items() if self._ternary(t)]

    def _ternary(self, t) -> bool:
        return t.tensor_type in (self._q.TQ1_0, self._q.TQ2_0)

    def info(self, name):
        if name.endswith("weight_scale"):
            return "F32", (1,)
        t = self.tensors.get(name)
        if t is None:
            raise ConversionError(f"the GGUF file has no tensor {name!r}")
        shape = tuple(int(x) for x in reversed(t.shape))  # ggml lists ne[0] (the row length) first
        if self._ternary(t):
            return "F32", shape
        kinds = {self._q.F32: "F32", self._q.F16: "F16", self._q.BF16: "BF16"}
        if t.tensor_type not in kinds:
            raise ConversionError(f"{self.path}: tensor {name} is {t.tensor_type.name}: bitdlm imports TQ1_0 / TQ2_0 "
                                  f"ternary weights and F32 / F16 / BF16 others (bitnet.cpp's I2_S / TL1 / TL2 "
                                  f"layouts are not documented: convert from the Hugging Face checkpoint)")
        return kinds[t.tensor_type], shape

    def raw(self, name, rows=None):
        if name.endswith("weight_scale"):
            return np.array([self._ternary_codes(name[:-len("_scale")])[1]], dtype=np.float32)
        t = self.tensors[name]
        if self._ternary(t):
            a = self._ternary_codes(name)[0].astype(np.float32)
        else:
            dt, shape = self.info(name)
            a = np.asarray(t.data).view({"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[dt]).reshape(shape)
        return a if rows is None else a[max(0, rows[0]):rows[1]]

    def _ternary_codes(self, name):
        if name not in self._codes:
            from gguf.quants import dequantize

            t = self.tensors[name]
            m, k = self.info(name)[1]
            blocks = np.asarray(t.data, dtype=np.uint8).reshape(-1)
            nb = blocks.size // (66 if t.tensor_type == self._q.TQ2_0 else 54)
            d = blocks.reshape(nb, -1)[:, -2:].copy().view("<f2").astype(np.float32).reshape(-1)  # d closes a block
            w = dequantize(np.asarray(t.data), t.tensor_type).reshape(nb, -1)
            live = d != 0
            ds = np.unique(d[live])
            if ds.size > 1:
                raise ConversionError(f"{self.path}: {name} has {ds.size} different block scales: not a BitNet "
                                      f"b1.58 ternary export (bitdlm needs one scale per tensor)")
            dv = ds[0] if ds.size else np.float32(1.0)
            codes = np.zeros(w.shape, np.int8)
            codes[live] = np.rint(w[live] / dv).astype(np.int8)
            self._codes[name] = (codes.reshape(m, k), np.float32(1.0) / dv)
        return self._codes[name]


def _tokenizer_json(reader, path: Path) -> str:
    """tokenizer.json text rebuilt from the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"{path}: GGUF tokenizer model {short_repr(kind)} is not supported (only byte-level "
                              f"BPE, 'gpt2'): pass --tokenizer DIR with the model's tokenizer.json")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or []
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    if _field(reader, "tokenizer.ggml.pre", "gpt2") in ("llama3", "llama-bpe", "llama-v3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # CONTROL, USER_DEFINED
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok.to_str()


def _config(reader, path: Path) -> dict:
    """config.json of the model, from the GGUF's `bitnet.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "bitnet":
        raise ConversionError(f"{path}: GGUF architecture {short_repr(arch)} is not supported (bitdlm imports "
                              f"'bitnet', llama.cpp's BitNet b1.58)")

    def get(key, default=None):
        v = _field(reader, f"bitnet.{key}", default)
        if v is None:
            raise ConversionError(f"{path}: GGUF metadata bitnet.{key} is missing")
        return v

    heads = int(get("attention.head_count"))
    h = int(get("embedding_length"))
    n_vocab = len(_field(reader, "tokenizer.ggml.tokens") or [])
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    cfg = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_size": h,
           "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
           "num_key_value_heads": int(get("attention.head_count_kv", heads)),
           "intermediate_size": int(get("feed_forward_length")),
           "vocab_size": int(embd.shape[1]) if embd is not None else n_vocab,
           "max_position_embeddings": int(get("context_length", 2048)),
           "rope_theta": float(get("rope.freq_base", 500000.0)),
           "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
           "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
           "hidden_act": "relu2"}
    rot = _field(reader, "bitnet.rope.dimension_count")
    if rot is not None:
        cfg["head_dim"] = int(rot)
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        v = _field(reader, f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[ours] = int(v)
    return cfg


def convert_report(path, out_path, *, tokenizer=None, lm_head="f16", embedding="f16", force=False,
                   **settings) -> dict:
    """Convert the GGUF file `path` into the bitdlm `.bin` `out_path`; the summary of
    hf.convert_report (settings: the same keyword arguments)."""
    path, out_path = Path(path), Path(out_path)
    check_options(out_path, force, lm_head, path, embedding)
    try:
        import gguf
    except ImportError:
        raise ConversionError("converting a GGUF file needs gguf: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ConversionError(f"{path}: not a readable GGUF file ({short_repr(str(e), 200)}); bitnet.cpp's "
                              f"I2_S / TL1 / TL2 types are not supported (undocumented layouts): convert the "
                              f"Hugging Face checkpoint") from None
    cfg = _config(reader, path)
    origin = {"converter": "bitdlm convert (GGUF)", "hf_dir": os.fsencode(path.resolve()).decode("utf-8", "replace")}
    with tempfile.TemporaryDirectory(prefix="bitdlm-gguf-") as tmp:
        files = Path(tokenizer) if tokenizer is not None else Path(tmp)
        if tokenizer is None:  # the GGUF's tokenizer and chat template as the files build() reads
            (files / "tokenizer.json").write_text(_tokenizer_json(reader, path), encoding="utf-8")
            tmpl = _field(reader, "tokenizer.chat_template")
            (files / "tokenizer_config.json").write_text(json.dumps(
                {"chat_template": tmpl} if isinstance(tmpl, str) else {}), encoding="utf-8")
        elif not (files / "tokenizer.json").is_file():
            raise ConversionError(f"--tokenizer {files}: no tokenizer.json there")
        return build(cfg, files, lambda: GGUFFile(reader, path), out_path, origin=origin,
                     linear_class="bitlinear", lm_head=lm_head, embedding=embedding, force=force, **settings)
