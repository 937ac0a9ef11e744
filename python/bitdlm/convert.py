"""`bitdlm convert`: a Hugging Face BitNet checkpoint -> one bitdlm `.bin`.

Reads config.json, model.safetensors (or shards + model.safetensors.index.json),
tokenizer.json, tokenizer_config.json (+ chat_template.jinja),
generation_config.json. Ternary weights come either as master weights
(bf16/fp16/fp32, quantized here with the BitNet absmean rule) or packed
(uint8 + weight_scale, `quantization_config.linear_class` autobitlinear or
bitlinear). Tensors are streamed one at a time (pread) from the safetensors files;
no torch needed.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

from . import packing
from .format import ModelWriter, expected_tensors, ModelFormatError, validate_meta

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
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: corrupted safetensors header: {e}") from None
            base = 8 + n
            self.entries = {}
            if not isinstance(header, dict):
                raise ConversionError(f"{path}: corrupted safetensors header")
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                try:
                    s, t = (int(x) for x in e["data_offsets"])
                    shape = [int(x) for x in e["shape"]]
                    e["dtype"]
                except (KeyError, TypeError, ValueError):
                    raise ConversionError(f"{path}: corrupted safetensors entry for {name!r}") from None
                if e["dtype"] not in _ST_DTYPES:
                    raise ConversionError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
                if not 0 <= s <= t or base + t > size:
                    raise ConversionError(f"{path}: tensor {name} lies outside the file (truncated?)")
                count = int(np.prod(shape, dtype=np.int64))
                if count * np.dtype(_ST_DTYPES[e["dtype"]]).itemsize != t - s:
                    raise ConversionError(f"{path}: tensor {name} size does not match its shape")
                self.entries[name] = (e["dtype"], tuple(shape), base + s, count)
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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
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

def _read_json(path: Path, required: bool):
    if not path.is_file():
        if required:
            raise ConversionError(f"{path.parent}: missing {path.name}")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


def _first(d: dict, keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def hyperparameters(cfg: dict) -> dict:
    archs = cfg.get("architectures") or []
    if archs:
        if not any(isinstance(a, str) and a.startswith("BitNet") for a in archs):
            raise ConversionError(f"unsupported architecture {archs}: bitdlm converts BitNet* "
                                  f"(ternary BitNet b1.58) checkpoints only")
    elif cfg.get("model_type") != "bitnet":
        raise ConversionError(f"unsupported model_type {cfg.get('model_type')!r}: bitdlm converts "
                              f"BitNet checkpoints only")
    act = cfg.get("hidden_act", "relu2")
    if act != "relu2":
        raise ConversionError(f"unsupported hidden_act {act!r} (bitdlm implements relu2)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConversionError("checkpoints with linear biases are not supported")
    try:
        h = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        hp = {
            "architecture": "bitnet",
            "hidden_size": h,
            "num_hidden_layers": int(cfg["num_hidden_layers"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
            "head_dim": int(cfg.get("head_dim") or h // heads),
            "intermediate_size": int(cfg["intermediate_size"]),
            "vocab_size": int(cfg["vocab_size"]),
            "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048)),
        }
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json: bad hyperparameter ({e})") from None
    rope = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling")
    rtype = rope.get("rope_type") or (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type")
    if rtype not in (None, "default"):
        raise ConversionError(f"RoPE scaling {rtype!r} is not supported (only plain RoPE)")
    hp["rope_theta"] = float(rope.get("rope_theta") or cfg.get("rope_theta") or 500000.0)
    hp["rms_norm_eps"] = float(cfg.get("rms_norm_eps", 1e-5))
    hp["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    hp["hidden_act"] = "relu2"
    return hp


def _token_content(v):
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _ids(v) -> list:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _special_tokens(cfg, tok_cfg, gen_cfg, tokenizer, vocab_size, mask_arg):
    def tid(content):
        if content is None:
            return None
        return tokenizer.token_to_id(content)

    bos = _first(gen_cfg, ["bos_token_id"], cfg.get("bos_token_id"))
    if bos is None:
        bos = tid(_token_content(tok_cfg.get("bos_token")))
    eos = []
    for v in (gen_cfg.get("eos_token_id"), cfg.get("eos_token_id"),
              tid(_token_content(tok_cfg.get("eos_token")))):
        for i in _ids(v):
            if i not in eos:
                eos.append(i)
    pad = _first(gen_cfg, ["pad_token_id"], cfg.get("pad_token_id"))
    if pad is None:
        pad = tid(_token_content(tok_cfg.get("pad_token")))

    if mask_arg is not None:
        s = str(mask_arg)
        if s.isdigit():
            mask = int(s)
        else:
            mask = tokenizer.token_to_id(s)
            if mask is None:
                raise ConversionError(f"mask token {s!r} is not in the tokenizer")
    else:
        mask = _first(cfg, _CFG_MASK)
        if mask is None:
            mask = tid(_token_content(tok_cfg.get("mask_token")))
        if mask is None:
            for t in KNOWN_MASK_TOKENS:
                mask = tokenizer.token_to_id(t)
                if mask is not None:
                    break
    out = {}
    for key, v in (("bos_token_id", bos), ("mask_token_id", mask), ("pad_token_id", pad)):
        if v is not None and not 0 <= int(v) < vocab_size:
            if key == "mask_token_id":
                raise ConversionError(f"mask token id {v} is outside the vocabulary [0, {vocab_size})")
            print(f"bitdlm convert: warning: {key} {v} outside the vocabulary, dropped", file=sys.stderr)
            v = None
        out[key] = None if v is None else int(v)
    bad = [i for i in eos if not 0 <= i < vocab_size]
    if bad:
        print(f"bitdlm convert: warning: eos ids {bad} outside the vocabulary, dropped", file=sys.stderr)
    out["eos_token_ids"] = [i for i in eos if 0 <= i < vocab_size]
    return out


def _chat_template(hf_dir: Path, tok_cfg: dict):
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if t is None and (hf_dir / "chat_template.jinja").is_file():
        t = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if t is None and (hf_dir / "chat_template.json").is_file():
        t = _read_json(hf_dir / "chat_template.json", False).get("chat_template")
    return t if isinstance(t, str) else None


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


def _f16_blocks(blocks):
    for b in blocks:
        out = b.astype(np.float16)
        if not np.isfinite(out).all():
            raise ConversionError("value out of the float16 range in an embedding / lm_head")
        yield out


def quantize_lm_head_i8(w: np.ndarray):
    """Per-row absmax int8: w ~= q * scale[row], scale = max|row| / 127."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = (np.maximum(amax, np.float32(1e-8)) / np.float32(127.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


# --------------------------------------------------------------------------- main entry

def convert(hf_dir, out_path, *, mask_token=None, block_size=None, small_block_size=None,
            threshold=None, shift=None, lm_head="f16", force=False, progress=True) -> Path:
    """Convert a Hugging Face BitNet checkpoint directory into `out_path`.

    Raises ConversionError (a ValueError) with a user-facing message; on any
    failure no output file is left behind."""
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

    cfg = _read_json(hf_dir / "config.json", True)
    hp = hyperparameters(cfg)
    tok_cfg = _read_json(hf_dir / "tokenizer_config.json", False)
    gen_cfg = _read_json(hf_dir / "generation_config.json", False)
    tok_path = hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ConversionError(f"{hf_dir}: missing tokenizer.json (the fast tokenizer is embedded in the .bin)")
    tok_json = tok_path.read_text(encoding="utf-8")
    from tokenizers import Tokenizer
    try:
        tokenizer = Tokenizer.from_str(tok_json)
    except Exception as e:  # tokenizers raises its own Exception type
        raise ConversionError(f"{tok_path}: cannot be loaded by `tokenizers`: {e}") from None
    ntok = tokenizer.get_vocab_size(with_added_tokens=True)
    if ntok > hp["vocab_size"]:
        raise ConversionError(f"tokenizer has {ntok} tokens but the model's vocab_size is {hp['vocab_size']}")

    qc = cfg.get("quantization_config") or {}
    if qc and qc.get("quant_method", "bitnet") != "bitnet":
        raise ConversionError(f"unsupported quantization_config.quant_method {qc.get('quant_method')!r}")
    linear_class = qc.get("linear_class", "bitlinear") if qc else None

    try:
        diffusion = {
            "block_size": int(block_size if block_size is not None
                              else _first(cfg, _CFG_BLOCK, DEFAULT_BLOCK_SIZE)),
            "small_block_size": int(small_block_size if small_block_size is not None
                                    else _first(cfg, _CFG_SMALL, DEFAULT_SMALL_BLOCK_SIZE)),
            "threshold": float(threshold if threshold is not None
                               else _first(cfg, _CFG_THRESHOLD, DEFAULT_THRESHOLD)),
            "shift_logits": bool(shift if shift is not None else _first(cfg, _CFG_SHIFT, True)),
        }
    except (TypeError, ValueError) as e:
        raise ConversionError(f"bad diffusion setting in config.json: {e}") from None
    if diffusion["small_block_size"] > diffusion["block_size"] and small_block_size is None:
        diffusion["small_block_size"] = diffusion["block_size"]  # e.g. --block-size 1 (AR)

    meta = dict(hp)
    meta["quant"] = {"weights": "i2_b128", "lm_head": lm_head}
    meta.update(_special_tokens(cfg, tok_cfg, gen_cfg, tokenizer, hp["vocab_size"], mask_token))
    meta["diffusion"] = diffusion
    meta["chat_template"] = _chat_template(hf_dir, tok_cfg)
    meta["tokenizer_json"] = tok_json
    try:
        validate_meta(meta)
    except ModelFormatError as e:
        raise ConversionError(str(e)) from None
    if meta["mask_token_id"] is None:
        print("bitdlm convert: warning: no mask token found (config, tokenizer_config or a known "
              "mask token); diffusion decoding needs --mask-token", file=sys.stderr)

    specs = expected_tensors(meta)
    ckpt = Checkpoint(hf_dir)
    try:
        for name in ckpt.names():
            if name.endswith(".bias"):
                raise ConversionError(f"checkpoint has a bias {name}: not supported")
        kinds = set()
        for name, (dtype, _shape) in specs.items():
            if dtype == "i2_b128" and name in ckpt:
                kinds.add("packed" if ckpt.info(name)[0] == "U8" else
                          "offline" if name[:-6] + "weight_scale" in ckpt else "master")
        meta["source"] = {"converter": "bitdlm convert", "hf_dir": str(hf_dir.resolve()),
                          "architectures": cfg.get("architectures"),
                          "quantization_config": qc or None, "weights": sorted(kinds)}
        h, v = hp["hidden_size"], hp["vocab_size"]
        from tqdm import tqdm

        with ModelWriter(out_path, meta, specs, overwrite=force) as w:
            bar = tqdm(total=len(specs), desc="convert", unit="tensor", disable=not progress)
            for name, (dtype, shape) in specs.items():
                bar.set_postfix_str(name[-40:], refresh=False)
                if dtype == "i2_b128":
                    codes, s = ternary_tensor(ckpt, name, shape, linear_class)
                    w.write(name, packing.pack_i2(codes), scale=float(s))
                elif name == "model.embed_tokens.weight":
                    w.write(name, _f16_blocks(_row_blocks(ckpt, name, shape)))
                elif name.startswith("lm_head."):
                    if name == "lm_head.scale":
                        bar.update(1)
                        continue  # written together with lm_head.weight
                    src = "model.embed_tokens.weight" if hp["tie_word_embeddings"] else "lm_head.weight"
                    if src not in ckpt:
                        raise ConversionError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
                    if dtype == "i8":
                        # per-row scales: quantize block by block, scales collected on the way
                        scales = []

                        def q_blocks():
                            for b in _row_blocks(ckpt, src, (v, h)):
                                q, sc = quantize_lm_head_i8(b)
                                scales.append(sc)
                                yield q

                        w.write("lm_head.weight", q_blocks())
                        w.write("lm_head.scale", np.concatenate(scales))
                    else:
                        w.write(name, _f16_blocks(_row_blocks(ckpt, src, (v, h))))
                else:  # norms
                    w.write(name, ckpt.f32(name, shape))
                bar.update(1)
            bar.close()
            w.commit()
    finally:
        ckpt.close()
    return out_path


def run_cli(args) -> int:
    try:
        out = convert(args.hf_dir, args.out, mask_token=args.mask_token, block_size=args.block_size,
                      small_block_size=args.small_block_size, threshold=args.threshold,
                      shift=args.shift, lm_head=args.lm_head, force=args.force,
                      progress=not args.quiet)
    except (ConversionError, FileExistsError) as e:
        print(f"bitdlm convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
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
