"""A checkpoint's settings: hyperparameters from config.json, special tokens,
chat template and diffusion defaults, each with where it came from."""
from __future__ import annotations

from pathlib import Path

from ..format import LIMITS, MAX_CHAT_TEMPLATE_CHARS, MAX_TOKENIZER_CHARS, finite_float, is_int, short_repr
from .common import ConversionError, read_json

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


def first(d: dict, keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def first_key(d: dict, keys):
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
        raise ConversionError(f"config.json: architectures must be a list of names, got {short_repr(archs)}")
    if archs:
        # case-blind: some saved configs spell it `BitnetForCausalLM`
        if not any(isinstance(a, str) and a.lower().startswith("bitnet") for a in archs):
            raise ConversionError(f"unsupported architecture {short_repr(archs)}: bitdlm converts BitNet* "
                                  f"(ternary BitNet b1.58) checkpoints only")
    elif cfg.get("model_type") != "bitnet" and not (cfg.get("model_type") is None and "num_kv_heads" in cfg):
        # (a config with num_kv_heads and no model_type is the users' BitNetLlama training code's)
        raise ConversionError(f"unsupported model_type {short_repr(cfg.get('model_type'))}: bitdlm converts "
                              f"BitNet checkpoints only")
    act = cfg.get("hidden_act", "relu2")
    if act != "relu2":
        raise ConversionError(f"unsupported hidden_act {short_repr(act)} (bitdlm implements relu2)")
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
        if not is_int(v) or not 0 < v <= LIMITS[key]:
            raise ConversionError(f"config.json: {key} must be an integer in [1, {LIMITS[key]}], got {short_repr(v)}")
        return v

    def number(key, v, default, lo, hi):
        if v is None:
            guessed.append(f"{key} not in config.json: {default:g}")
            return float(default)
        f = finite_float(v)
        if f is None or not lo <= f <= hi:
            raise ConversionError(f"config.json: {key} must be a number in [{lo:g}, {hi:g}], got {short_repr(v)}")
        return f

    if cfg.get("num_key_value_heads") is None and cfg.get("num_kv_heads") is not None:
        cfg = {**cfg, "num_key_value_heads": cfg["num_kv_heads"]}  # BitNetLlama's spelling
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
        raise ConversionError(f"RoPE scaling {short_repr(rtype)} is not supported (only plain RoPE)")
    hp["rope_theta"] = number("rope_theta", first(rope, ["rope_theta"], cfg.get("rope_theta")), 500000.0, 1e-6, 1e15)
    hp["rms_norm_eps"] = number("rms_norm_eps", cfg.get("rms_norm_eps"), 1e-5, 1e-30, 1.0)
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        guessed.append("tie_word_embeddings not in config.json: false")
        tie = False
    if not isinstance(tie, bool):
        raise ConversionError(f"config.json: tie_word_embeddings must be true or false, got {short_repr(tie)}")
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
    if not all(is_int(x) for x in vs):
        raise ConversionError(f"{what} must be a token id or a list of token ids, got {short_repr(v)}")
    return vs


def _token_id(tokenizer, content: str):
    """tokenizer.token_to_id, None for a string `tokenizers` cannot take (a lone surrogate)."""
    try:
        return tokenizer.token_to_id(content)
    except UnicodeEncodeError:
        return None


def special_tokens(cfg, tok_cfg, gen_cfg, tokenizer, vocab_size, mask_arg, dropped: list, dlm=None):
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
        src, mask = setting(dlm_sources(cfg, dlm), _CFG_MASK)
        if mask is not None and not is_int(mask):
            raise ConversionError(f"{src} must be a token id, got {short_repr(mask)}")
        if mask is None:
            mask, src = named("dlm_config.json", "mask_token", dlm)
        if mask is None:
            mask, src = named("tokenizer_config.json", "mask_token", tok_cfg)
        if mask is None:
            for t in KNOWN_MASK_TOKENS:
                mask = tokenizer.token_to_id(t)
                if mask is not None:
                    src = f"recognised name {t!r} in tokenizer.json"
                    break
        if mask is None:
            src = ("none: not in dlm_config.json / config.json (" + ", ".join(_CFG_MASK) + "), tokenizer_config.json "
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


def chat_template(hf_dir: Path, tok_cfg: dict, dropped: list):
    """(template or None, where it came from)."""
    t, src = tok_cfg.get("chat_template"), "tokenizer_config.json chat_template"
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        name = "default" if named.get("default") else next(iter(named), None)
        t = named.get(name)
        src += f" (the {name!r} one of {sorted(str(n) for n in named)})"
    if t is not None and not isinstance(t, str):
        dropped.append(f"tokenizer_config.json chat_template is not a string ({short_repr(t)})")
        t = None
    if t is None and (hf_dir / "chat_template.jinja").is_file():
        try:
            t, src = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
        except UnicodeDecodeError:
            raise ConversionError(f"{hf_dir / 'chat_template.jinja'}: not UTF-8 text") from None
    if t is None and (hf_dir / "chat_template.json").is_file():
        t, src = read_json(hf_dir / "chat_template.json", False).get("chat_template"), "chat_template.json"
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


def load_tokenizer(hf_dir: Path, vocab_size: int):
    """(tokenizer.json text, its `tokenizers.Tokenizer`), checked to fit the vocabulary."""
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
        raise ConversionError(f"{tok_path}: cannot be loaded by `tokenizers`: {short_repr(str(e), 200)}") from None
    ntok = tokenizer.get_vocab_size(with_added_tokens=True)
    if ntok > vocab_size:
        raise ConversionError(f"tokenizer has {ntok} tokens but the model's vocab_size is {vocab_size}")
    return tok_json, tokenizer


def linear_class_of(cfg: dict):
    """quantization_config's linear_class (the weight_scale convention), None without one."""
    qc = cfg.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ConversionError(f"config.json: quantization_config must be an object, got {short_repr(qc)}")
    if qc and qc.get("quant_method", "bitnet") != "bitnet":
        raise ConversionError(f"unsupported quantization_config.quant_method {short_repr(qc.get('quant_method'))}")
    return qc.get("linear_class", "bitlinear") if qc else None


def dlm_sources(cfg: dict, dlm: dict | None) -> list:
    """Where the diffusion settings are looked up, first found wins: the users'
    training writes them to dlm_config.json beside config.json."""
    return [("dlm_config.json", dlm or {}), ("config.json", cfg)]


def setting(sources: list, keys):
    """("<file> <key>", value) of the first of `keys` set in the first source that
    has one, else (None, None)."""
    for file, d in sources:
        k, v = first_key(d, keys)
        if k is not None:
            return f"{file} {k}", v
    return None, None


def diffusion_settings(cfg: dict, block_size=None, small_block_size=None, threshold=None, shift=None,
                       dlm: dict | None = None):
    """meta's `diffusion` and, per key, where its value came from: a flag, else a
    dlm_config.json or config.json key, else our default."""
    diffusion, diff_src = {}, {}
    for key, arg, keys, default, conv in (
            ("block_size", block_size, _CFG_BLOCK, DEFAULT_BLOCK_SIZE, int),
            ("small_block_size", small_block_size, _CFG_SMALL, DEFAULT_SMALL_BLOCK_SIZE, int),
            ("threshold", threshold, _CFG_THRESHOLD, DEFAULT_THRESHOLD, float),
            ("shift_logits", shift, _CFG_SHIFT, True, bool)):
        if arg is not None:
            v, src = arg, "flag"
        else:
            src, v = setting(dlm_sources(cfg, dlm), keys)
            if src is None:
                src, v = "default", default
        ok = (isinstance(v, bool) if conv is bool else
              is_int(v) or (isinstance(v, float) and v.is_integer()) if conv is int else finite_float(v) is not None)
        if not ok:
            raise ConversionError(f"bad diffusion setting: {key} = {short_repr(v)} ({src})")
        diffusion[key], diff_src[key] = conv(v), src
    if diffusion["small_block_size"] > diffusion["block_size"] and small_block_size is None:
        diffusion["small_block_size"] = diffusion["block_size"]  # e.g. --block-size 1 (AR)
        diff_src["small_block_size"] = "= block_size (the default was larger)"
    return diffusion, diff_src
