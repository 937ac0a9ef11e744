"""`bitdlm convert`: a Hugging Face BitNet checkpoint -> one bitdlm `.bin`.

Reads config.json, model.safetensors (or shards + model.safetensors.index.json),
tokenizer.json, tokenizer_config.json (+ chat_template.jinja),
generation_config.json. Ternary weights come either as master weights
(bf16/fp16/fp32, quantized here with the BitNet absmean rule) or packed
(uint8 + weight_scale, `quantization_config.linear_class` autobitlinear or
bitlinear). Tensors are streamed one at a time (pread) from the safetensors files;
no torch needed.

Every input is type- and range-checked (the format's LIMITS) and every needed
tensor located before the output exists; errors are ConversionError, which the
CLI prints as one line with exit status 2. `convert_report` returns the summary
the CLI prints (tokens chosen and why, chat template, guesses, drops, measured
precision loss). The output is written through format.ModelWriter's temporary
file, which SIGTERM / SIGHUP / Ctrl-C do not leave behind (docs/format.md).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import struct
import sys
import threading
from pathlib import Path

import numpy as np

from . import packing
from .format import (LIMITS, MAX_CHAT_TEMPLATE_CHARS, MAX_TOKENIZER_CHARS, ModelFormatError,
                     ModelWriter, _is_int, _num, _short, expected_tensors, validate_meta)

DEFAULT_BLOCK_SIZE = 32
DEFAULT_SMALL_BLOCK_SIZE = 8
DEFAULT_THRESHOLD = 0.9
# tokens recognised as the diffusion mask when neither the user nor the config names one
KNOWN_MASK_TOKENS = ("<|mask|>", "|<MASK>|", "<|MASK|>", "<mask>", "[MASK]", "<MASK>", "<|mdm_mask|>")
# optional DLM config keys, first found wins
_CFG_MASK = ("mask_token_id", "mask_id")
_CFG_BLOCK = ("bd_size", "block_size", "diffusion_block_size")
_CFG_SMALL = ("small_block_size", "sub_block_size")
_CFG_THRESHOLD = ("threshold", "confidence_threshold")
_CFG_SHIFT = ("shift_logits", "logits_shift", "shift")


class ConversionError(ValueError):
    """The input checkpoint cannot be converted (clear message for the user)."""


# --------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1", "I8": "i1",
              "I16": "<i2", "I32": "<i4", "I64": "<i8", "BOOL": "?"}


class _SafetensorsFile:
    """Minimal safetensors reader (bf16 without torch)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        try:
            if size < 8:
                raise ConversionError(f"{path}: not a safetensors file (truncated)")
            (n,) = struct.unpack("<Q", self._f.read(8))
            if n > size - 8 or n > 100 << 20:
                raise ConversionError(f"{path}: not a safetensors file or truncated (header length {n})")
            try:
                header = json.loads(self._f.read(n))
            except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, huge ints, deep nesting
                raise ConversionError(f"{path}: corrupted safetensors header: {_short(str(e), 200)}") from None
            base = 8 + n
            self.entries = {}
            if not isinstance(header, dict):
                raise ConversionError(f"{path}: corrupted safetensors header")
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                try:
                    s, t = e["data_offsets"]
                    shape = list(e["shape"])
                    dtype = e["dtype"]
                except (KeyError, TypeError, ValueError):
                    raise ConversionError(f"{path}: corrupted safetensors entry for {_short(name)}") from None
                if not (_is_int(s) and _is_int(t) and all(_is_int(x) and 0 <= x < 1 << 40 for x in shape)
                        and len(shape) <= 8):
                    raise ConversionError(f"{path}: corrupted safetensors entry for {_short(name)}")
                if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
                    raise ConversionError(f"{path}: tensor {_short(name)} has unsupported dtype {_short(dtype)}")
                if not 0 <= s <= t or base + t > size:
                    raise ConversionError(f"{path}: tensor {_short(name)} lies outside the file (truncated?)")
                count = math.prod(shape)
                if count * np.dtype(_ST_DTYPES[dtype]).itemsize != t - s:
                    raise ConversionError(f"{path}: tensor {_short(name)} size does not match its shape")
                self.entries[name] = (dtype, tuple(shape), base + s, count)
        except BaseException:
            self._f.close()
            raise

    def raw(self, name: str, rows: tuple | None = None) -> np.ndarray:
        """Read a tensor (or rows [start, stop) of it) from disk.

        pread, not mmap: the pages of a multi-GB input do not pile up in this
        process's resident set; only the tensor being converted is in memory."""
        dtype, shape, off, count = self.entries[name]
        dt = np.dtype(_ST_DTYPES[dtype])
        if rows is not None:
            row = int(np.prod(shape[1:], dtype=np.int64))
            start, stop = max(0, rows[0]), min(shape[0], rows[1])
            off += start * row * dt.itemsize
            count = max(0, stop - start) * row
            shape = (max(0, stop - start),) + tuple(shape[1:])
        out = np.empty(count, dtype=dt)
        buf = memoryview(out).cast("B")
        done = 0
        while done < len(buf):
            n = os.preadv(self._f.fileno(), [buf[done:]], off + done)
            if n <= 0:
                raise ConversionError(f"{self.path}: unexpected end of file reading {name}")
            done += n
        return out.reshape(shape)

    def close(self):
        self._f.close()


def _to_f32(a: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":  # bf16 is the top half of an fp32
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


class Checkpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, by name."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index, True).get("weight_map")
            if (not isinstance(weight_map, dict)
                    or not all(isinstance(v, str) and v and "/" not in v and "\\" not in v
                               and v not in (".", "..") for v in weight_map.values())):
                raise ConversionError(f"{index}: not a valid safetensors index (weight_map must map "
                                      f"tensor names to shard file names in the same folder)")
            files = sorted(set(weight_map.values()))
        elif (hf_dir / "model.safetensors").is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            weight_map = None
            if not files:
                other = [p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
                hint = f" (found {other[:3]}: only safetensors checkpoints are supported)" if other else ""
                raise ConversionError(f"{hf_dir}: no model.safetensors or safetensors shards{hint}")
        self.files = {}
        self.where = {}
        try:
            for fn in files:
                p = hf_dir / fn
                if not p.is_file():
                    raise ConversionError(f"{p}: shard listed in the index is missing")
                sf = _SafetensorsFile(p)
                self.files[fn] = sf
                for name in sf.entries:
                    self.where[name] = sf
        except BaseException:
            self.close()
            raise
        if weight_map is not None:
            missing = [n for n, fn in weight_map.items() if n not in self.where]
            if missing:
                raise ConversionError(f"tensors listed in the index but absent from their shard: {missing[:5]}")

    def __contains__(self, name):
        return name in self.where

    def names(self):
        return self.where.keys()

    def info(self, name):
        if name not in self.where:
            raise ConversionError(f"checkpoint has no tensor {name!r}")
        dtype, shape, _, _ = self.where[name].entries[name]
        return dtype, shape

    def raw(self, name, rows=None):
        if name not in self.where:
            raise ConversionError(f"checkpoint has no tensor {name!r}")
        return self.where[name].raw(name, rows)

    def f32_check(self, name, shape=None):
        dtype, sh = self.info(name)
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise ConversionError(f"tensor {name!r} is {dtype}, expected a float tensor")
        if shape is not None and tuple(sh) != tuple(shape):
            raise ConversionError(f"tensor {name!r} has shape {list(sh)}, expected {list(shape)} "
                                  f"from config.json")
        return dtype

    def f32(self, name, shape=None, rows=None) -> np.ndarray:
        a = _to_f32(self.raw(name, rows), self.f32_check(name, shape))
        if not np.isfinite(a).all():
            raise ConversionError(f"tensor {name!r} holds NaN or infinite values")
        return a

    def close(self):
        for sf in self.files.values():
            sf.close()
        self.files = {}


# --------------------------------------------------------------------------- config

def _read_json(path: Path, required: bool) -> dict:
    """A JSON object file (an empty dict when optional and absent)."""
    if not path.is_file():
        if required:
            raise ConversionError(f"{path.parent}: missing {path.name}")
        return {}
    if path.stat().st_size > 64 << 20:
        raise ConversionError(f"{path}: {path.stat().st_size} bytes is too large for a config file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, huge ints, deep nesting
        raise ConversionError(f"{path}: invalid JSON ({_short(str(e), 200)})") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object, got a {type(d).__name__}")
    return d


def _first(d: dict, keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _first_key(d: dict, keys):
    """(key, value) of the first of `keys` set in d, else (None, None)."""
    for k in keys:
        if d.get(k) is not None:
            return k, d[k]
    return None, None


_MISSING = object()


def archs_of(cfg: dict) -> list:
    """config.json's architectures as a list of names (a bare string counts as one)."""
    archs = cfg.get("architectures") or []
    return [a for a in ([archs] if isinstance(archs, str) else archs if isinstance(archs, list) else [])
            if isinstance(a, str)]


def hyperparameters(cfg: dict, guessed: list | None = None) -> dict:
    """The model's hyperparameters from config.json, type- and range-checked.
    Defaults that stand in for a missing key are described in `guessed`."""
    guessed = [] if guessed is None else guessed
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list):
        raise ConversionError(f"config.json: architectures must be a list of names, got {_short(archs)}")
    if archs:
        if not any(isinstance(a, str) and a.startswith("BitNet") for a in archs):
            raise ConversionError(f"unsupported architecture {_short(archs)}: bitdlm converts BitNet* "
                                  f"(ternary BitNet b1.58) checkpoints only")
    elif cfg.get("model_type") != "bitnet":
        raise ConversionError(f"unsupported model_type {_short(cfg.get('model_type'))}: bitdlm converts "
                              f"BitNet checkpoints only")
    act = cfg.get("hidden_act", "relu2")
    if act != "relu2":
        raise ConversionError(f"unsupported hidden_act {_short(act)} (bitdlm implements relu2)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConversionError("checkpoints with linear biases are not supported")

    def integer(key, default=_MISSING, why=""):
        v = cfg.get(key)
        if v is None:
            if default is _MISSING:
                raise ConversionError(f"config.json lacks {key!r}")
            guessed.append(f"{key} not in config.json: {default}{why}")
            v = default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_int(v) or not 0 < v <= LIMITS[key]:
            raise ConversionError(f"config.json: {key} must be an integer in [1, {LIMITS[key]}], got {_short(v)}")
        return v

    def number(key, v, default, lo, hi):
        if v is None:
            guessed.append(f"{key} not in config.json: {default:g}")
            return float(default)
        f = _num(v)
        if f is None or not lo <= f <= hi:
            raise ConversionError(f"config.json: {key} must be a number in [{lo:g}, {hi:g}], got {_short(v)}")
        return f

    h = integer("hidden_size")
    heads = integer("num_attention_heads")
    hp = {"architecture": "bitnet", "hidden_size": h, "num_hidden_layers": integer("num_hidden_layers"),
          "num_attention_heads": heads,
          "num_key_value_heads": integer("num_key_value_heads", heads, " (= num_attention_heads, no GQA)")}
    if cfg.get("head_dim") is None and h % heads:
        raise ConversionError(f"config.json: hidden_size {h} is not a multiple of num_attention_heads "
                              f"{heads} and there is no head_dim")
    hp["head_dim"] = integer("head_dim", h // heads, " (= hidden_size / num_attention_heads)")
    hp["intermediate_size"] = integer("intermediate_size")
    hp["vocab_size"] = integer("vocab_size")
    hp["max_position_embeddings"] = integer("max_position_embeddings", 2048)
    rope = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict) or not isinstance(rope_scaling, dict):
        raise ConversionError("config.json: rope_parameters / rope_scaling must be objects")
    rtype = rope.get("rope_type") or rope_scaling.get("rope_type") or rope_scaling.get("type")
    if rtype not in (None, "default"):
        raise ConversionError(f"RoPE scaling {_short(rtype)} is not supported (only plain RoPE)")
    hp["rope_theta"] = number("rope_theta", _first(rope, ["rope_theta"], cfg.get("rope_theta")), 500000.0, 1e-6, 1e15)
    hp["rms_norm_eps"] = number("rms_norm_eps", cfg.get("rms_norm_eps"), 1e-5, 1e-30, 1.0)
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        guessed.append("tie_word_embeddings not in config.json: false")
        tie = False
    if not isinstance(tie, bool):
        raise ConversionError(f"config.json: tie_word_embeddings must be true or false, got {_short(tie)}")
    hp["tie_word_embeddings"] = tie
    hp["hidden_act"] = "relu2"
    return hp


def _token_content(v):
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _ids(v, what: str) -> list:
    if v is None:
        return []
    vs = v if isinstance(v, list) else [v]
    if not all(_is_int(x) for x in vs):
        raise ConversionError(f"{what} must be a token id or a list of token ids, got {_short(v)}")
    return vs


def _token_id(tokenizer, content: str):
    """tokenizer.token_to_id, None for a string `tokenizers` cannot take (a lone surrogate)."""
    try:
        return tokenizer.token_to_id(content)
    except UnicodeEncodeError:
        return None


def _special_tokens(cfg, tok_cfg, gen_cfg, tokenizer, vocab_size, mask_arg, dropped: list):
    """meta's bos/mask/pad/eos ids and, for the summary, where each came from:
    {"bos_token_id": (id or None, source), ..., "eos_token_ids": [(id, source), ...]}."""
    def named(file, key, d):
        content = _token_content(d.get(key))
        if content is None:
            return None, None
        i = _token_id(tokenizer, content)
        if i is None:
            dropped.append(f"{file} {key} {content!r} is not in the tokenizer")
            return None, None
        return i, f"{file} {key} {content!r}"

    def from_ids(key):
        for file, d in (("generation_config.json", gen_cfg), ("config.json", cfg)):
            v = d.get(key)
            if v is not None:
                ids = _ids(v, f"{file} {key}")
                if ids:
                    return ids[0], f"{file} {key}"
        return None, None

    chosen = {}
    for key, tok_key in (("bos_token_id", "bos_token"), ("pad_token_id", "pad_token")):
        i, src = from_ids(key)
        if i is None:
            i, src = named("tokenizer_config.json", tok_key, tok_cfg)
        chosen[key] = (i, src or f"none (no {key} in generation_config.json / config.json, "
                                  f"no {tok_key} in tokenizer_config.json)")
    eos = []
    for file, d in (("generation_config.json", gen_cfg), ("config.json", cfg)):
        for i in _ids(d.get("eos_token_id"), f"{file} eos_token_id"):
            if i not in [e for e, _ in eos]:
                eos.append((i, f"{file} eos_token_id"))
    i, src = named("tokenizer_config.json", "eos_token", tok_cfg)
    if i is not None and i not in [e for e, _ in eos]:
        eos.append((i, src))

    if mask_arg is not None:
        s = str(mask_arg)
        if s.isdigit():
            mask, src = int(s), "--mask-token"
        else:
            mask = _token_id(tokenizer, s)
            if mask is None:
                raise ConversionError(f"mask token {s!r} is not in the tokenizer")
            src = f"--mask-token {s!r}"
    else:
        key, mask = _first_key(cfg, _CFG_MASK)
        src = f"config.json {key}" if key else None
        if mask is not None and not _is_int(mask):
            raise ConversionError(f"config.json {key} must be a token id, got {_short(mask)}")
        if mask is None:
            mask, src = named("tokenizer_config.json", "mask_token", tok_cfg)
        if mask is None:
            for t in KNOWN_MASK_TOKENS:
                mask = tokenizer.token_to_id(t)
                if mask is not None:
                    src = f"recognised name {t!r} in tokenizer.json"
                    break
        if mask is None:
            src = ("none: not in config.json (" + ", ".join(_CFG_MASK) + "), tokenizer_config.json "
                   "mask_token, nor a known name (" + " ".join(KNOWN_MASK_TOKENS) + ")")
    chosen["mask_token_id"] = (mask, src)

    out = {}
    for key in ("bos_token_id", "mask_token_id", "pad_token_id"):
        v, src = chosen[key]
        if v is not None and not 0 <= v < vocab_size:
            if key == "mask_token_id":
                raise ConversionError(f"mask token id {v} is outside the vocabulary [0, {vocab_size})")
            dropped.append(f"{key} {v} ({src}) is outside the vocabulary [0, {vocab_size})")
            chosen[key] = (None, f"none ({src} gave {v}, outside the vocabulary)")
            v = None
        out[key] = v
    for i, src in eos:
        if not 0 <= i < vocab_size:
            dropped.append(f"eos id {i} ({src}) is outside the vocabulary [0, {vocab_size})")
    chosen["eos_token_ids"] = [(i, src) for i, src in eos if 0 <= i < vocab_size]
    out["eos_token_ids"] = [i for i, _ in chosen["eos_token_ids"]]
    return out, chosen


def _chat_template(hf_dir: Path, tok_cfg: dict, dropped: list):
    """(template or None, where it came from)."""
    t, src = tok_cfg.get("chat_template"), "tokenizer_config.json chat_template"
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        name = "default" if named.get("default") else next(iter(named), None)
        t = named.get(name)
        src += f" (the {name!r} one of {sorted(str(n) for n in named)})"
    if t is not None and not isinstance(t, str):
        dropped.append(f"tokenizer_config.json chat_template is not a string ({_short(t)})")
        t = None
    if t is None and (hf_dir / "chat_template.jinja").is_file():
        try:
            t, src = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
        except UnicodeDecodeError:
            raise ConversionError(f"{hf_dir / 'chat_template.jinja'}: not UTF-8 text") from None
    if t is None and (hf_dir / "chat_template.json").is_file():
        t, src = _read_json(hf_dir / "chat_template.json", False).get("chat_template"), "chat_template.json"
        if not isinstance(t, str):
            t = None
    if t is not None:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
            raise ConversionError(f"{src}: the chat template is not valid Unicode (lone surrogate)") from None
    if t is not None and len(t) > MAX_CHAT_TEMPLATE_CHARS:
        raise ConversionError(f"{src}: the chat template has {len(t)} characters (at most "
                              f"{MAX_CHAT_TEMPLATE_CHARS})")
    return (t, src) if t else (None, None)


# --------------------------------------------------------------------------- tensors

def unpack_hf_packed(packed: np.ndarray, out_features: int) -> np.ndarray:
    """transformers' packed BitNet layout -> int8 ternary codes [out, in].

    uint8 [R, in] with R = ceil(out/4): row i*R + r of W sits in bits 2i..2i+1
    of byte row r (transformers.integrations.bitnet.unpack_weights)."""
    packed = np.asarray(packed, dtype=np.uint8)
    r = packed.shape[0]
    u = np.stack([(packed >> (2 * i)) & 3 for i in range(4)])  # [4, R, in]
    codes = u.reshape(4 * r, packed.shape[1])[:out_features]
    if codes.max(initial=0) > 2:
        raise ConversionError("packed weight holds the invalid 2-bit code 3")
    return codes.astype(np.int8) - 1


def _weight_scale(ckpt: Checkpoint, name: str) -> float:
    dtype, shape = ckpt.info(name)
    a = _to_f32(ckpt.raw(name), dtype).reshape(-1)
    if a.size != 1:
        raise ConversionError(f"{name} has {a.size} values, expected one per-tensor scale")
    v = np.float32(a[0])
    if not np.isfinite(v) or v <= 0:
        raise ConversionError(f"{name} = {v} is not a positive finite scale")
    return v


def ternary_tensor(ckpt: Checkpoint, name: str, shape, linear_class):
    """Codes int8 [M, K] and s_w (y = codes.x / (s_w * s_a)) of one ternary weight."""
    m, k = shape
    sname = name[: -len("weight")] + "weight_scale"
    dtype, sh = ckpt.info(name)
    if sname not in ckpt:
        if dtype == "U8":
            raise ConversionError(f"{name} is packed uint8 but {sname} is missing")
        codes, s = packing.weight_quant(ckpt.f32(name, shape))
        return codes, s
    if linear_class not in ("autobitlinear", "bitlinear"):
        raise ConversionError(f"{sname} present but quantization_config.linear_class is "
                              f"{linear_class!r}: the scale convention is unknown")
    if dtype == "U8":
        if tuple(sh) != ((m + 3) // 4, k):
            raise ConversionError(f"packed {name} has shape {list(sh)}, expected "
                                  f"{[(m + 3) // 4, k]} for a [{m}, {k}] weight")
        codes = unpack_hf_packed(ckpt.raw(name), m)
    else:  # offline weights stored unpacked: already ternary values
        w = ckpt.f32(name, shape)
        codes = np.rint(w).astype(np.int8)
        if not np.array_equal(codes, w) or np.abs(codes).max(initial=0) > 1:
            raise ConversionError(f"{name} has a weight_scale but its values are not ternary")
    ws = _weight_scale(ckpt, sname)
    # autobitlinear: y = (x W) * weight_scale, weight_scale = mean|W|
    # bitlinear:     y = (x_q W) / (weight_scale * s_a), weight_scale = 1/mean|W|
    s = np.float32(1.0) / ws if linear_class == "autobitlinear" else ws
    return codes, np.float32(s)


def _row_blocks(ckpt: Checkpoint, name: str, shape, rows: int = 8192):
    """fp32 row blocks of a [V, H] float tensor: the big embedding / lm_head are
    never materialised whole in fp32."""
    ckpt.f32_check(name, shape)
    for i in range(0, shape[0], rows):
        yield ckpt.f32(name, shape, (i, i + rows))


def quantize_lm_head_i8(w: np.ndarray):
    """Per-row absmax int8: w ~= q * scale[row], scale = max|row| / 127."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = (np.maximum(amax, np.float32(1e-8)) / np.float32(127.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


# --------------------------------------------------------------------------- main entry

class Terminated(SystemExit):
    """SIGTERM / SIGHUP during a conversion: unwinds like an exception, so the
    writer's cleanup runs and no temporary file is left (exit status 128 + signal)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_unwind():
    """Turn SIGTERM / SIGHUP into Terminated for the block (SIGINT already raises
    KeyboardInterrupt). Only on the main thread, and only where nobody installed
    a handler of their own."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum, _frame):
            raise Terminated(signum)

        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class _ErrorMeter:
    """Max |stored - source| of a tensor written in row blocks (the precision the
    f16 / i8 storage loses), measured on the way."""

    def __init__(self, src_dtype: str, stored: str):
        self.src_dtype, self.stored = src_dtype, stored
        self.max_abs_error = 0.0
        self.max_abs_value = 0.0

    def add(self, src: np.ndarray, stored_f32: np.ndarray) -> None:
        if src.size:
            self.max_abs_error = max(self.max_abs_error, float(np.abs(stored_f32 - src).max()))
            self.max_abs_value = max(self.max_abs_value, float(np.abs(src).max()))

    def as_dict(self) -> dict:
        return {"source_dtype": self.src_dtype, "stored": self.stored,
                "max_abs_error": self.max_abs_error, "max_abs_value": self.max_abs_value,
                "exact": self.max_abs_error == 0.0}


def _f16_blocks_of(blocks, meter):
    for b in blocks:
        out = b.astype(np.float16)
        if not np.isfinite(out).all():
            raise ConversionError("value out of the float16 range in an embedding / lm_head")
        meter.add(b, out.astype(np.float32))
        yield out


def _precheck(ckpt: Checkpoint, specs: dict, hp: dict, linear_class) -> None:
    """Every tensor the output needs is in the checkpoint with a usable dtype and
    shape: checked from the safetensors headers before the output file exists."""
    for name, (dtype, shape) in specs.items():
        if dtype == "i2_b128":
            m, k = shape
            sname = name[: -len("weight")] + "weight_scale"
            st, sh = ckpt.info(name)
            if sname in ckpt:
                if linear_class not in ("autobitlinear", "bitlinear"):
                    raise ConversionError(f"{sname} present but quantization_config.linear_class is "
                                          f"{_short(linear_class)}: the scale convention is unknown "
                                          f"(expected 'autobitlinear' or 'bitlinear')")
                if st == "U8":
                    if tuple(sh) != ((m + 3) // 4, k):
                        raise ConversionError(f"packed {name} has shape {list(sh)}, expected "
                                              f"{[(m + 3) // 4, k]} for a [{m}, {k}] weight")
                else:
                    ckpt.f32_check(name, shape)
                ckpt.f32_check(sname)
            elif st == "U8":
                raise ConversionError(f"{name} is packed uint8 but {sname} is missing")
            else:
                ckpt.f32_check(name, shape)
        elif name == "lm_head.scale":
            continue
        elif name == "lm_head.weight":
            src = "model.embed_tokens.weight" if hp["tie_word_embeddings"] else "lm_head.weight"
            if src not in ckpt:
                raise ConversionError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
            ckpt.f32_check(src, shape)
        else:
            ckpt.f32_check(name, shape)


def convert(hf_dir, out_path, **kwargs) -> Path:
    """Convert a Hugging Face BitNet checkpoint directory into `out_path`; returns
    the path. Keyword arguments as convert_report(), whose summary this drops."""
    return Path(convert_report(hf_dir, out_path, **kwargs)["output"])


def convert_report(hf_dir, out_path, *, mask_token=None, block_size=None, small_block_size=None,
                   threshold=None, shift=None, lm_head="f16", force=False, progress=True) -> dict:
    """Convert a Hugging Face BitNet checkpoint directory into `out_path`.

    Returns the summary `bitdlm convert` prints: the tokens chosen and where from,
    the chat template, the diffusion settings, what was guessed or dropped, and
    the precision the f16 / i8 storage lost (measured). Raises ConversionError
    (a ValueError) with a user-facing message; on any failure (SIGTERM / SIGINT
    included) no output file and no temporary file is left behind."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if not hf_dir.exists():
        raise ConversionError(f"{hf_dir}: no such directory")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory (expected a Hugging Face checkpoint folder)")
    if out_path.is_dir():
        raise ConversionError(f"output {out_path} is a directory")
    if out_path.exists() and not force:
        raise ConversionError(f"output {out_path} already exists (use --force to overwrite)")
    if not out_path.parent.is_dir():
        raise ConversionError(f"output directory {out_path.parent} does not exist")
    if lm_head not in ("f16", "i8"):
        raise ConversionError(f"--lm-head must be f16 or i8, got {lm_head!r}")

    guessed, dropped = [], []
    cfg = _read_json(hf_dir / "config.json", True)
    hp = hyperparameters(cfg, guessed)
    tok_cfg = _read_json(hf_dir / "tokenizer_config.json", False)
    gen_cfg = _read_json(hf_dir / "generation_config.json", False)
    tok_path = hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ConversionError(f"{hf_dir}: missing tokenizer.json (the fast tokenizer is embedded in the .bin)")
    if tok_path.stat().st_size > MAX_TOKENIZER_CHARS:
        raise ConversionError(f"{tok_path}: {tok_path.stat().st_size} bytes, more than the "
                              f"{MAX_TOKENIZER_CHARS} a model file holds")
    try:
        tok_json = tok_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConversionError(f"{tok_path}: not UTF-8 text") from None
    from tokenizers import Tokenizer
    try:
        tokenizer = Tokenizer.from_str(tok_json)
    except Exception as e:  # tokenizers raises its own Exception type
        raise ConversionError(f"{tok_path}: cannot be loaded by `tokenizers`: {_short(str(e), 200)}") from None
    ntok = tokenizer.get_vocab_size(with_added_tokens=True)
    if ntok > hp["vocab_size"]:
        raise ConversionError(f"tokenizer has {ntok} tokens but the model's vocab_size is {hp['vocab_size']}")

    qc = cfg.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ConversionError(f"config.json: quantization_config must be an object, got {_short(qc)}")
    if qc and qc.get("quant_method", "bitnet") != "bitnet":
        raise ConversionError(f"unsupported quantization_config.quant_method {_short(qc.get('quant_method'))}")
    linear_class = qc.get("linear_class", "bitlinear") if qc else None

    # diffusion settings: a flag, else a config key, else our default
    diffusion, diff_src = {}, {}
    for key, arg, keys, default, conv in (
            ("block_size", block_size, _CFG_BLOCK, DEFAULT_BLOCK_SIZE, int),
            ("small_block_size", small_block_size, _CFG_SMALL, DEFAULT_SMALL_BLOCK_SIZE, int),
            ("threshold", threshold, _CFG_THRESHOLD, DEFAULT_THRESHOLD, float),
            ("shift_logits", shift, _CFG_SHIFT, True, bool)):
        if arg is not None:
            v, src = arg, "flag"
        else:
            ck, v = _first_key(cfg, keys)
            src = f"config.json {ck}" if ck else "default"
            if ck is None:
                v = default
        ok = (isinstance(v, bool) if conv is bool else
              _is_int(v) or (isinstance(v, float) and v.is_integer()) if conv is int else _num(v) is not None)
        if not ok:
            raise ConversionError(f"bad diffusion setting in config.json: {key} = {_short(v)} ({src})")
        diffusion[key], diff_src[key] = conv(v), src
    if diffusion["small_block_size"] > diffusion["block_size"] and small_block_size is None:
        diffusion["small_block_size"] = diffusion["block_size"]  # e.g. --block-size 1 (AR)
        diff_src["small_block_size"] = "= block_size (the default was larger)"

    meta = dict(hp)
    meta["quant"] = {"weights": "i2_b128", "lm_head": lm_head}
    ids, chosen = _special_tokens(cfg, tok_cfg, gen_cfg, tokenizer, hp["vocab_size"], mask_token, dropped)
    meta.update(ids)
    meta["diffusion"] = diffusion
    meta["chat_template"], template_src = _chat_template(hf_dir, tok_cfg, dropped)
    meta["tokenizer_json"] = tok_json
    try:
        validate_meta(meta)
    except ModelFormatError as e:
        raise ConversionError(str(e)) from None

    specs = expected_tensors(meta)
    ckpt = Checkpoint(hf_dir)
    try:
        for name in ckpt.names():
            if name.endswith(".bias"):
                raise ConversionError(f"checkpoint has a bias {name}: not supported")
        _precheck(ckpt, specs, hp, linear_class)
        kinds = set()
        for name, (dtype, _shape) in specs.items():
            if dtype == "i2_b128":
                kinds.add("packed" if ckpt.info(name)[0] == "U8" else
                          "offline" if name[:-6] + "weight_scale" in ckpt else "master")
        used = set(specs) | {n[:-6] + "weight_scale" for n in specs}
        if hp["tie_word_embeddings"] and "lm_head.weight" in ckpt:
            dropped.append("lm_head.weight (tie_word_embeddings is true: the embedding is the lm_head)")
            used.add("lm_head.weight")
        unused = sorted(set(ckpt.names()) - used)
        if unused:
            dropped.append(f"{len(unused)} checkpoint tensors not used by the model: {unused[:5]}"
                           f"{' ...' if len(unused) > 5 else ''}")
        # provenance: only plain values of the config (no NaN, no nesting), the header stays strict JSON
        plain = {k: v for k, v in qc.items() if isinstance(k, str) and len(k) <= 64 and (
            v is None or isinstance(v, (str, bool)) and len(str(v)) <= 256
            or _is_int(v) and abs(v) < 2**53 or isinstance(v, float) and math.isfinite(v))}
        # a non-UTF-8 directory name decodes with surrogate escapes: not storable as UTF-8
        src_dir = os.fsencode(hf_dir.resolve()).decode("utf-8", "replace")
        meta["source"] = {"converter": "bitdlm convert", "hf_dir": src_dir,
                          "architectures": [a for a in archs_of(cfg) if len(a) <= 256],
                          "quantization_config": plain or None, "weights": sorted(kinds)}
        h, v = hp["hidden_size"], hp["vocab_size"]
        precision = {}
        from tqdm import tqdm

        with _signals_unwind(), ModelWriter(out_path, meta, specs, overwrite=force) as w:
            bar = tqdm(total=len(specs), desc="convert", unit="tensor", disable=not progress)
            for name, (dtype, shape) in specs.items():
                bar.set_postfix_str(name[-40:], refresh=False)
                if dtype == "i2_b128":
                    codes, s = ternary_tensor(ckpt, name, shape, linear_class)
                    w.write(name, packing.pack_i2(codes), scale=float(s))
                elif name == "model.embed_tokens.weight":
                    meter = precision[name] = _ErrorMeter(ckpt.info(name)[0], "f16")
                    w.write(name, _f16_blocks_of(_row_blocks(ckpt, name, shape), meter))
                elif name.startswith("lm_head."):
                    if name == "lm_head.scale":
                        bar.update(1)
                        continue  # written together with lm_head.weight
                    src = "model.embed_tokens.weight" if hp["tie_word_embeddings"] else "lm_head.weight"
                    if dtype == "i8":
                        # per-row scales: quantize block by block, scales collected on the way
                        scales = []
                        meter = precision["lm_head.weight"] = _ErrorMeter(ckpt.info(src)[0], "i8")

                        def q_blocks():
                            for b in _row_blocks(ckpt, src, (v, h)):
                                q, sc = quantize_lm_head_i8(b)
                                meter.add(b, q.astype(np.float32) * sc[:, None])
                                scales.append(sc)
                                yield q

                        w.write("lm_head.weight", q_blocks())
                        w.write("lm_head.scale", np.concatenate(scales))
                    else:
                        meter = precision[name] = _ErrorMeter(ckpt.info(src)[0], "f16")
                        w.write(name, _f16_blocks_of(_row_blocks(ckpt, src, (v, h)), meter))
                else:  # norms
                    w.write(name, ckpt.f32(name, shape))
                bar.update(1)
            bar.close()
            w.commit()
    finally:
        ckpt.close()

    tok_of = lambda i: None if i is None else tokenizer.id_to_token(i)  # noqa: E731
    tokens = {k[:-len("_token_id")]: {"id": chosen[k][0], "token": tok_of(chosen[k][0]), "source": chosen[k][1]}
              for k in ("mask_token_id", "bos_token_id", "pad_token_id")}
    tokens["eos"] = [{"id": i, "token": tok_of(i), "source": src} for i, src in chosen["eos_token_ids"]]
    for k, t in list(tokens.items()):
        for e in (t if isinstance(t, list) else [t]):
            if e["id"] is not None and e["token"] is None:
                guessed.append(f"{k} id {e['id']} has no text in the tokenizer ({ntok} tokens, "
                               f"vocab_size {hp['vocab_size']})")
    if meta["mask_token_id"] is None:
        guessed.append("no mask token: diffusion decoding needs one (re-convert with --mask-token)")
    return {
        "output": str(out_path), "bytes": out_path.stat().st_size,
        "weights": sorted(kinds), "linear_class": linear_class if kinds - {"master"} else None,
        "lm_head": lm_head, "tokens": tokens,
        "chat_template": {"present": meta["chat_template"] is not None, "source": template_src,
                          "chars": len(meta["chat_template"] or "")},
        "diffusion": {k: {"value": diffusion[k], "source": diff_src[k]} for k in diffusion},
        "guessed": guessed, "dropped": dropped,
        "precision": {k: m.as_dict() for k, m in precision.items()},
    }


def format_summary(r: dict) -> str:
    """The summary `bitdlm convert` prints (from convert_report's dict)."""
    def tok(e):
        if e["id"] is None:
            return e["source"]
        return f"{e['id']} {e['token']!r} ({e['source']})"

    t = r["tokens"]
    lines = [f"wrote {r['output']} ({r['bytes'] / 2**20:.1f} MiB)",
             f"  mask token:    {tok(t['mask'])}",
             f"  bos token:     {tok(t['bos'])}",
             f"  eos tokens:    {'; '.join(tok(e) for e in t['eos']) or 'none (generation never stops early)'}",
             f"  pad token:     {tok(t['pad'])}"]
    ct = r["chat_template"]
    lines.append(f"  chat template: {ct['chars']} characters ({ct['source']})" if ct["present"] else
                 "  chat template: none: `bitdlm generate --chat` and /v1/chat/completions will fail "
                 "with this model (add chat_template to tokenizer_config.json or a chat_template.jinja)")
    lines.append("  diffusion:     " + ", ".join(f"{k} {d['value']} ({d['source']})"
                                                for k, d in r["diffusion"].items()))
    w = ", ".join(r["weights"])
    lines.append(f"  ternary:       {w}" + (f" (linear_class {r['linear_class']})" if r["linear_class"] else "")
                 + (": quantized here with BitNet absmean, as transformers does" if "master" in r["weights"] else ""))
    for name, p in r["precision"].items():
        what = "embedding" if name == "model.embed_tokens.weight" else "lm_head"
        if p["exact"]:
            lines.append(f"  precision:     {what} {p['source_dtype']} -> {p['stored']}: exact")
            continue
        lines.append(f"  precision:     {what} {p['source_dtype']} -> {p['stored']}: max |delta| "
                     f"{p['max_abs_error']:.3g} (largest |w| {p['max_abs_value']:.3g})")
        if what == "embedding" and r["lm_head"] == "f16" and "lm_head.weight" not in r["precision"]:
            lines.append("                 the tied lm_head reads these rows: every logit h.w moves by up to "
                         "sum|h| x that against the source model")
        elif what == "lm_head":
            lines.append("                 every logit h.w moves by up to sum|h| x that against the source model")
    for g in r["guessed"]:
        lines.append(f"  guessed:       {g}")
    for d in r["dropped"]:
        lines.append(f"  dropped:       {d}")
    return "\n".join(lines)


def run_cli(args) -> int:
    try:
        report = convert_report(args.hf_dir, args.out, mask_token=args.mask_token, block_size=args.block_size,
                                small_block_size=args.small_block_size, threshold=args.threshold,
                                shift=args.shift, lm_head=args.lm_head, force=args.force,
                                progress=not args.quiet)
    except (ConversionError, ModelFormatError, FileExistsError) as e:
        print(f"bitdlm convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a file vanishing under us
        where = f"{e.filename}: " if e.filename else ""
        print(f"bitdlm convert: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitdlm convert: interrupted, no output written", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"bitdlm convert: terminated by signal {e.signum}, no output written", file=sys.stderr)
        return e.code
    print(format_summary(report))
    return 0


def add_arguments(p) -> None:
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("out", help="output .bin file")
    p.add_argument("--mask-token", default=None, metavar="TOKEN_OR_ID",
                   help="diffusion mask token (string or id); default: config mask_token_id, "
                        "tokenizer_config mask_token, or a known mask token in the tokenizer")
    p.add_argument("--block-size", type=int, default=None, help=f"diffusion block size (default: config or {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--small-block-size", type=int, default=None,
                   help=f"diffusion sub-block size (default: config or {DEFAULT_SMALL_BLOCK_SIZE})")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"confidence threshold for parallel unmasking (default: config or {DEFAULT_THRESHOLD})")
    p.add_argument("--shift", dest="shift", action="store_true", default=None,
                   help="logits at i-1 predict token i (default: config or on)")
    p.add_argument("--no-shift", dest="shift", action="store_false", help="logits at i predict token i")
    p.add_argument("--lm-head", choices=("f16", "i8"), default="f16", help="lm_head storage (default f16)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face BitNet checkpoint to a .bin")
    add_arguments(p)
    p.set_defaults(func=run_cli)
