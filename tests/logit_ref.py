"""Why bitdlm's logits differ from transformers': a float64 reference and a code-by-code diff.

    from logit_ref import Case, diagnose
    rep = diagnose(Case(hidden=512, layers=2, heads=8, kv_heads=2, head_dim=64, theta=1e4, tokens=24), tmp)
    print(rep.text())             # first differing activation code, its exact value, its distance to .5
    rep.ok                        # every logit difference > 1e-3 explained (the rule below)

Three runs of one random BitNet checkpoint (tests/hf_models.py):
- bitdlm (`_core.Model.forward_trace`: the logits and every int8 activation code);
- transformers in fp32 (forward pre-hooks record the codes its ActQuant makes);
- Ref64 below: the model's math (shared reference.md section 1) in float64 numpy,
  TEACHER-FORCED: at each activation quantization it computes the exact pre-rounding
  value v = a * 127 / max|a| from the codes an implementation chose before, then
  continues with that implementation's codes. So for every code there is an exact
  value and a distance to its rounding boundary, |frac(|v|) - 1/2| (in code units).

Ref64 runs under two semantics, both teacher-forced by bitdlm's codes:
- "bitdlm": the weights as the .bin stores them (ternary codes and scales, the
  fp16 embedding / lm_head) and K/V read from the cache in the cache dtype;
- "hf": the checkpoint as transformers quantizes it (its fp32 WeightQuant of the
  master weights, the master embedding / lm_head, fp32 K/V).
RoPE angles are fp32 in both (transformers computes its rotary table in fp32
whatever the model dtype; bitdlm likewise); cos/sin of them are exact.

The rule (`Report.ok`), for every position p where |bitdlm - transformers| > 1e-3:
- some activation code at a position <= p differs between bitdlm and transformers
  (a code at position q only reaches positions >= q, causal attention), and the first
  such code (in computation order; the histories before it are equal, so one exact
  value holds for both) is a NEAR TIE: within TIE of the boundary under either
  semantics, or on different sides of it under the two (the stored fp16 embedding /
  the fp16 KV cache / a weight code moved the exact value across: a model
  difference, not an arithmetic one); or
- no code differs and the two semantics' exact logits differ by > 1e-3 themselves
  (fp16 storage of an fp32 lm_head), bitdlm matching its own within 1e-4.
And everywhere: each bitdlm code equals the exact "bitdlm" code except near ties
(`self_flips`), i.e. bitdlm computes its own model right up to fp32 rounding.

TIE = 5e-4 code units (a pre-rounding value is 127 * a / max|a|, up to 127), for
bitdlm's codes against its exact model, transformers' against its own, and so for
the first code where the two differ (same history, so each is within its own
noise of the one exact value). fp32 norms, RoPE, attention, transformers' fp32
F.linear of dequantized values: relative errors of ~1e-7 on values up to 127.
The 60-case sweep's farthest flips: bitdlm 6.3e-5, transformers 3.4e-5
(docs/logits.md), so the bound has an 8x margin, and a wrong computation would
land a flip this close to a boundary with probability 0.1% per flip.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import dataclasses
from pathlib import Path

import numpy as np

TIE = 5e-4
REF_TOL = 1e-4  # bitdlm logits vs its exact model given its own codes (fp32 vs fp64 arithmetic)
LOGIT_TOL = 1e-3
OPS = ("attn_in", "attn_sub", "mlp_in", "mlp_sub")  # the activation quantizations of a layer, in order
_HOOKED = {"self_attn.q_proj": "attn_in", "self_attn.o_proj": "attn_sub", "mlp.gate_proj": "mlp_in",
           "mlp.down_proj": "mlp_sub"}
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclasses.dataclass
class Case:
    """One random checkpoint and one forward. prefill: tokens run (and cached) in a first
    call, the rest in a second call that reads them from the KV cache (0: one call)."""
    hidden: int = 256
    layers: int = 2
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    inter: int = 384
    vocab: int = 320
    theta: float = 1e4
    tied: bool = True
    dtype: str = "bfloat16"
    kv: str = "f32"
    tokens: int = 24
    prefill: int = 0
    seed: int = 0

    def name(self) -> str:
        return (f"h{self.hidden}_L{self.layers}_{self.heads}/{self.kv_heads}x{self.head_dim}_i{self.inter}"
                f"_v{self.vocab}_th{self.theta:g}_{'tied' if self.tied else 'untied'}_{self.dtype}_kv{self.kv}"
                f"_T{self.tokens}p{self.prefill}_s{self.seed}")


def random_case(rng: np.random.Generator, seed: int) -> Case:
    """A shape nobody picked: hidden 64-1024, head_dim 32/64/128, GQA 1-8, 1-8 layers,
    rope_theta 1e4-1e6, tied or not, odd vocab sizes, 1-128 tokens, bf16/fp16/fp32, f32/f16 cache."""
    while True:  # transformers' BitNet needs heads * head_dim == hidden (attn_sub_norm is [hidden])
        hd = int(rng.choice([32, 64, 128]))
        kvh = int(rng.integers(1, 5))
        gqa = int(rng.choice([1, 2, 3, 4, 8]))
        heads = kvh * gqa
        hidden = heads * hd
        if 64 <= hidden <= 1024:
            break
    layers = int(rng.integers(1, 9))
    if hidden * layers > 2048:  # keep one case under a few seconds on 2 cores
        layers = max(1, 2048 // hidden)
    tokens = int(rng.choice([1, 2, 5, 16, 24, 33, 64, 100, 128]))
    return Case(hidden=hidden, layers=layers, heads=heads, kv_heads=kvh, head_dim=hd,
                inter=int(rng.integers(hidden, 3 * hidden)) | 1 if rng.random() < 0.5 else 8 * int(rng.integers(hidden // 8, 3 * hidden // 8 + 1)),
                vocab=int(rng.integers(260, 700)) | 1, theta=float(10 ** rng.uniform(4, 6)),
                tied=bool(rng.random() < 0.5), dtype=str(rng.choice(["bfloat16", "float16", "float32"])),
                kv=str(rng.choice(["f32", "f16"])), tokens=tokens,
                prefill=int(rng.integers(1, tokens)) if tokens > 1 and rng.random() < 0.5 else 0, seed=seed)


# ---------------------------------------------------------------- float64 reference

def _round_half_even(v):
    return np.rint(v)


def act_codes(a):
    """(exact pre-rounding values v = a * s, s) per row, s = 127 / max(max|a|, 1e-5) (float64)."""
    s = 127.0 / np.maximum(np.abs(a).max(-1, keepdims=True), 1e-5)
    return a * s, s


def tie_distance(v):
    """Distance of |v| to the nearest k + 1/2 (0 = an exact tie), in code units."""
    a = np.abs(v)
    return np.abs(a - np.floor(a) - 0.5)


def rope_tables(positions, hd, theta):
    """cos/sin of the fp32 RoPE angles (transformers' rotary table is fp32 whatever the dtype)."""
    inv = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
    ang = (np.asarray(positions, np.float32)[:, None] * inv[None, :]).astype(np.float64)
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang), np.sin(ang)


def _rms(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def _rot_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


class Ref64:
    """The quantized BitNet forward in float64 from explicit weights:
    w[name] = (codes int8 [M, K], s_w) for the ternary linears, f64 arrays otherwise
    ("embed", "head", "norm", per layer "in_norm", "post_norm", "attn_sub", "ffn_sub")."""

    def __init__(self, w: dict, cfg: dict):
        self.w, self.c = w, cfg

    def _lin(self, name, codes, s):
        q, sw = self.w[name]
        return (codes.astype(np.float64) @ q.T.astype(np.float64)) / (sw * s)

    def forward(self, tokens, forced=None, cached=0, kv_f16=False):
        """logits [T, V] and per op (layer, op, v [T, K]). forced: {(layer, op): codes [T, K]}
        to continue with instead of round(v). cached: positions [0, cached) were computed in an
        earlier call, so later queries read their K/V through the cache (fp16 if kv_f16)."""
        c, w = self.c, self.w
        T = len(tokens)
        H, nh, nkv, hd = c["hidden"], c["heads"], c["kv_heads"], c["head_dim"]
        cos, sin = rope_tables(np.arange(T), hd, c["theta"])
        x = w["embed"][np.asarray(tokens)]
        causal = np.tril(np.ones((T, T), bool))
        ops = []

        def quant(layer, op, a):
            v, s = act_codes(a)
            ops.append((layer, op, v))
            codes = forced[(layer, op)] if forced is not None else np.clip(_round_half_even(v), -128, 127)
            return codes, s

        for l in range(c["layers"]):
            p = f"model.layers.{l}."
            cA, sA = quant(l, "attn_in", _rms(x, w[p + "in_norm"], c["eps"]))
            q = self._lin(p + "self_attn.q_proj", cA, sA).reshape(T, nh, hd)
            k = self._lin(p + "self_attn.k_proj", cA, sA).reshape(T, nkv, hd)
            v = self._lin(p + "self_attn.v_proj", cA, sA).reshape(T, nkv, hd)
            q = q * cos[:, None] + _rot_half(q) * sin[:, None]
            k = k * cos[:, None] + _rot_half(k) * sin[:, None]
            att = np.empty((T, nh, hd))
            for h in range(nh):
                g = h // (nh // nkv)
                kk, vv = k[:, g], v[:, g]
                sc = (q[:, h] @ kk.T) * hd ** -0.5
                if kv_f16 and cached:  # queries of the later call see the cached K/V as fp16
                    kq = kk[:cached].astype(np.float16).astype(np.float64)
                    vq = vv[:cached].astype(np.float16).astype(np.float64)
                    sc[cached:, :cached] = (q[cached:, h] @ kq.T) * hd ** -0.5
                sc = np.where(causal, sc, -np.inf)
                pr = np.exp(sc - sc.max(-1, keepdims=True))
                pr /= pr.sum(-1, keepdims=True)
                o = pr @ vv
                if kv_f16 and cached:
                    o[cached:] = pr[cached:, :cached] @ vq + pr[cached:, cached:] @ vv[cached:]
                att[:, h] = o
            cB, sB = quant(l, "attn_sub", _rms(att.reshape(T, nh * hd), w[p + "attn_sub"], c["eps"]))
            x = x + self._lin(p + "self_attn.o_proj", cB, sB)
            cC, sC = quant(l, "mlp_in", _rms(x, w[p + "post_norm"], c["eps"]))
            gt = self._lin(p + "mlp.gate_proj", cC, sC)
            up = self._lin(p + "mlp.up_proj", cC, sC)
            cD, sD = quant(l, "mlp_sub", _rms(np.maximum(gt, 0) ** 2 * up, w[p + "ffn_sub"], c["eps"]))
            x = x + self._lin(p + "mlp.down_proj", cD, sD)
        return _rms(x, w["norm"], c["eps"]) @ w["head"].T, ops


def _f64(t):
    return np.asarray(t.detach().double().numpy() if hasattr(t, "detach") else t, np.float64)


def hf_weights(hf):
    """Ref64 weights of transformers' quantized model (its own WeightQuant arithmetic, fp32)."""
    from hf_models import reference_quant

    sd = hf.state_dict()
    w = {"embed": _f64(sd["model.embed_tokens.weight"]), "norm": _f64(sd["model.norm.weight"])}
    w["head"] = _f64(sd["lm_head.weight"]) if "lm_head.weight" in sd else w["embed"]
    for l in range(hf.config.num_hidden_layers):
        p = f"model.layers.{l}."
        for n, k in (("input_layernorm", "in_norm"), ("post_attention_layernorm", "post_norm"),
                     ("self_attn.attn_sub_norm", "attn_sub"), ("mlp.ffn_sub_norm", "ffn_sub")):
            w[p + k] = _f64(sd[p + n + ".weight"])
        for n in _LINEARS:
            codes, scale = reference_quant(sd[p + n + ".weight"])
            w[p + n] = (codes.numpy(), float(scale))
    return w


def bin_weights(model):
    """Ref64 weights as a loaded bitdlm .bin stores them."""
    from bitdlm.format import embedding_table
    from bitdlm.packing import unpack_i2

    f, m = model.file, model.meta
    arr = lambda n: np.asarray(f.array(n), np.float64)  # noqa: E731
    weight, scale = embedding_table(m)
    emb = np.asarray(f.array(weight), np.float32)
    if scale is not None:  # int8 rows: float(q) * scale in fp32, as the forward computes them
        emb = emb * np.asarray(f.array(scale), np.float32)[:, None]
    w = {"embed": emb.astype(np.float64), "norm": arr("model.norm.weight")}
    if m["quant"]["lm_head"] == "i8":
        w["head"] = np.asarray(f.array("lm_head.weight"), np.float64) * arr("lm_head.scale")[:, None]
    else:
        w["head"] = w["embed"] if m["tie_word_embeddings"] else arr("lm_head.weight")
    for l in range(m["num_hidden_layers"]):
        p = f"model.layers.{l}."
        for n, k in (("input_layernorm", "in_norm"), ("post_attention_layernorm", "post_norm"),
                     ("self_attn.attn_sub_norm", "attn_sub"), ("mlp.ffn_sub_norm", "ffn_sub")):
            w[p + k] = arr(p + n + ".weight")
        for n in _LINEARS:
            t = f.tensors[p + n + ".weight"]
            w[p + n] = (unpack_i2(f.array(t.name), t.shape[1]), float(t.scale))
    return w


# ---------------------------------------------------------------- the three runs

def hf_codes(hf, tokens):
    """transformers fp32 logits [T, V] and {(layer, op): codes [T, K]} as its ActQuant rounds them."""
    import torch

    codes, hooks = {}, []
    for name, mod in hf.named_modules():
        for suffix, op in _HOOKED.items():
            if name.endswith(suffix):
                layer = int(name.split(".")[2])

                def hook(mod, inp, layer=layer, op=op):
                    a = inp[0][0].float()
                    s = 127 / a.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
                    codes[(layer, op)] = (a * s).round().clamp(-128, 127).to(torch.int8).numpy()
                hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([list(tokens)]), use_cache=False).logits[0].numpy()
    finally:
        for h in hooks:
            h.remove()
    return out.astype(np.float64), codes


def bitdlm_codes(model, tokens, prefill=0):
    """bitdlm logits [T, V] and {(layer, op): codes [T, K]}, over one call or a prefill call
    (written to the cache) and a second call reading it."""
    core, T = model._core, len(tokens)
    toks = np.asarray(tokens, np.int32)
    seq = core.alloc_seq(T)
    try:
        parts = [(0, prefill), (prefill, T)] if prefill else [(0, T)]
        logits, codes = [], {}
        for a, b in parts:
            lg, ops = core.forward_trace([(seq, toks[a:b], a, a, True, np.arange(b - a, dtype=np.int32))], 1)
            logits.append(lg)
            for layer, op, c, _ in ops:
                codes.setdefault((layer, op), []).append(c)
    finally:
        core.free_seq(seq)
    return np.concatenate(logits).astype(np.float64), {k: np.concatenate(v) for k, v in codes.items()}


@dataclasses.dataclass
class Flip:
    layer: int
    op: str
    pos: int
    k: int
    bitdlm: int
    other: int
    v: float        # exact pre-rounding value ("bitdlm" semantics)
    v_hf: float     # the same under "hf" semantics
    dist: float     # min distance to the boundary of the two

    @property
    def straddle(self) -> bool:
        return np.rint(self.v) != np.rint(self.v_hf)

    @property
    def near_tie(self) -> bool:
        return self.dist <= TIE or self.straddle

    def __str__(self):
        why = "semantics straddle" if self.straddle else "near tie" if self.dist <= TIE else "NOT A TIE"
        return (f"layer {self.layer} {self.op} pos {self.pos} k {self.k}: codes {self.bitdlm} vs {self.other}, "
                f"exact {self.v:.6f} (hf semantics {self.v_hf:.6f}), distance {self.dist:.2e} [{why}]")


@dataclasses.dataclass
class Report:
    case: Case
    max_diff: float                  # max |bitdlm - transformers| over the logits
    bad_positions: list              # positions with a difference > 1e-3
    first_flip: dict                 # position -> the first differing code at a position <= it
    storage: list                    # bad positions explained by the semantics' own logits
    unexplained: list                # bad positions the rule does not cover
    self_flips: list                 # bitdlm codes != exact "bitdlm" codes (all must be near ties)
    weight_flips: int                # ternary codes the .bin and transformers' quantization disagree on
    max_self_dist: float = 0.0       # the largest distance among self_flips
    argmax_changed: int = 0
    hf_self_flips: list = dataclasses.field(default_factory=list)  # the same for transformers ("hf" semantics)
    first_op_same: bool = True       # layer 0's first codes identical in bitdlm and transformers
    ref_diff: float = 0.0            # max |bitdlm logits - its exact model's (teacher-forced)|

    @property
    def ok(self) -> bool:
        return (not self.unexplained and self.ref_diff <= REF_TOL
                and all(f.dist <= TIE for f in self.self_flips)
                and all(f.dist <= TIE for f in self.hf_self_flips))

    def text(self) -> str:
        lines = [f"{self.case.name()}: max |bitdlm - transformers| {self.max_diff:.2e}, "
                 f"{len(self.bad_positions)} positions > {LOGIT_TOL:g}, argmax changed at {self.argmax_changed}, "
                 f"ternary weight codes differing {self.weight_flips}, "
                 f"max |bitdlm - its exact model| {self.ref_diff:.1e}"]
        seen = set()
        for p in self.bad_positions:
            f = self.first_flip.get(p)
            if f is not None and id(f) not in seen:
                seen.add(id(f))
                lines.append(f"  first differing code (positions >= {f.pos}): {f}")
        if self.storage:
            lines.append(f"  positions {self.storage}: no code differs; the fp16-stored lm_head/embedding's own logits differ")
        if self.unexplained:
            lines.append(f"  UNEXPLAINED positions {self.unexplained}")
        for who, flips, tie in (("bitdlm", self.self_flips, TIE), ("transformers", self.hf_self_flips, TIE)):
            bad_self = [f for f in flips if f.dist > tie]
            worst = max((f.dist for f in flips), default=0.0)
            lines.append(f"  {who} vs its exact model: {len(flips)} codes off, farthest {worst:.2e} from a boundary"
                         + (f"; {len(bad_self)} beyond {tie:g}, first: {bad_self[0]}" if bad_self else ""))
        return "\n".join(lines)


def build(case: Case, tmp: Path):
    """(transformers model, bitdlm model) of a random checkpoint for `case` under tmp."""
    import bitdlm
    from bitdlm.convert import convert
    from hf_models import load_reference_model, make_hf_model

    hf_dir = make_hf_model(tmp / "hf", seed=case.seed, dtype=case.dtype, vocab_size=case.vocab,
                           hidden_size=case.hidden, intermediate_size=case.inter, num_hidden_layers=case.layers,
                           num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
                           head_dim=case.head_dim, rope_theta=case.theta, tie_word_embeddings=case.tied,
                           max_position_embeddings=max(512, case.tokens))
    out = convert(hf_dir, tmp / "model.bin", force=True, progress=False)
    hf = load_reference_model(hf_dir)
    return hf, bitdlm.load(out, threads=1, kv_dtype=case.kv)


def _flips(a: dict, b: dict, v_bd: dict, v_hf: dict):
    """Every (layer, op, pos, k) where the code dicts a and b differ, in computation order."""
    out = []
    for key in v_bd:
        d = np.argwhere(a[key] != b[key])
        for pos, k in d:
            vb, vh = float(v_bd[key][pos, k]), float(v_hf[key][pos, k])
            out.append(Flip(key[0], key[1], int(pos), int(k), int(a[key][pos, k]), int(b[key][pos, k]), vb, vh,
                            float(min(tie_distance(vb), tie_distance(vh)))))
    return out


def diagnose(case: Case, tmp, models=None) -> Report:
    tmp = Path(tmp)
    hf, bd = models or build(case, tmp)
    rng = np.random.default_rng(case.seed + 1000)
    tokens = rng.integers(0, case.vocab, case.tokens)
    lg_bd, c_bd = bitdlm_codes(bd, tokens, case.prefill)
    lg_hf, c_hf = hf_codes(hf, tokens)
    cfg = dict(hidden=case.hidden, layers=case.layers, heads=case.heads, kv_heads=case.kv_heads,
               head_dim=case.head_dim, theta=case.theta, eps=float(hf.config.rms_norm_eps))
    wb, wh = bin_weights(bd), hf_weights(hf)
    weight_flips = sum(int((wb[k][0] != wh[k][0]).sum()) for k in wb if isinstance(wb[k], tuple))
    ref_bd, ref_hf = Ref64(wb, cfg), Ref64(wh, cfg)
    lr_bd, ops_bd = ref_bd.forward(tokens, forced=c_bd, cached=case.prefill, kv_f16=case.kv == "f16")
    lr_hf, ops_hf = ref_hf.forward(tokens, forced=c_bd)
    _, ops_hf_own = ref_hf.forward(tokens, forced=c_hf)
    v_own = {(l, o): v for l, o, v in ops_hf_own}
    hf_self = _flips(c_hf, {k: np.clip(np.rint(v), -128, 127).astype(np.int8) for k, v in v_own.items()},
                     v_own, v_own)
    v_bd = {(l, o): v for l, o, v in ops_bd}
    v_hf = {(l, o): v for l, o, v in ops_hf}
    exact_bd = {k: np.clip(np.rint(v), -128, 127).astype(np.int8) for k, v in v_bd.items()}
    self_flips = _flips(c_bd, exact_bd, v_bd, v_hf)
    cross = _flips(c_bd, c_hf, v_bd, v_hf)
    diff = np.abs(lg_bd - lg_hf).max(-1)
    bad = [int(p) for p in np.nonzero(diff > LOGIT_TOL)[0]]
    first, storage, unexplained = {}, [], []
    for p in bad:
        f = next((f for f in cross if f.pos <= p), None)  # cross is in computation order
        if f is not None:
            first[p] = f
            if not f.near_tie:
                unexplained.append(p)
        elif (np.abs(lr_bd[p] - lr_hf[p]).max() > LOGIT_TOL
              and np.abs(lg_bd[p] - lr_bd[p]).max() <= 1e-4):
            storage.append(p)
        else:
            unexplained.append(p)
    return Report(case, float(diff.max()), bad, first, storage, unexplained, self_flips, weight_flips,
                  max((f.dist for f in self_flips), default=0.0),
                  int((lg_bd.argmax(-1) != lg_hf.argmax(-1)).sum()), hf_self,
                  bool(np.array_equal(c_bd[(0, "attn_in")], c_hf[(0, "attn_in")])),
                  float(np.abs(lg_bd - lr_bd).max()))


def sweep(n: int, seed0: int = 0, tmp=None, log=print) -> list:
    """diagnose() over n random cases (seeds seed0 ..); returns the reports."""
    import tempfile

    rng = np.random.default_rng(seed0)
    reports = []
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        for i in range(n):
            case = random_case(rng, seed0 + i)
            r = diagnose(case, Path(d) / str(i))
            reports.append(r)
            log(r.text())
    return reports


def summary(reports) -> dict:
    return {
        "cases": len(reports),
        "cases_over_tol": sum(1 for r in reports if r.bad_positions),
        "positions_over_tol": sum(len(r.bad_positions) for r in reports),
        "explained_by_near_tie": sum(1 for r in reports for p in r.bad_positions if p in r.first_flip
                                     and p not in r.unexplained),
        "explained_by_storage": sum(len(r.storage) for r in reports),
        "unexplained": sum(len(r.unexplained) for r in reports),
        "argmax_changed": sum(r.argmax_changed for r in reports),
        "weight_code_flips": sum(r.weight_flips for r in reports),
        "bitdlm_self_flips": sum(len(r.self_flips) for r in reports),
        "max_self_flip_distance": max((r.max_self_dist for r in reports), default=0.0),
        "transformers_self_flips": sum(len(r.hf_self_flips) for r in reports),
        "max_transformers_self_flip_distance": max((f.dist for r in reports for f in r.hf_self_flips), default=0.0),
        "first_op_identical": sum(r.first_op_same for r in reports),
        "max_first_flip_distance": max((f.dist for r in reports for f in r.first_flip.values()), default=0.0),
        "max_ref_diff": max((r.ref_diff for r in reports), default=0.0),
        "all_ok": all(r.ok for r in reports),
    }


if __name__ == "__main__":  # pragma: no cover - see scripts/logit_diag.py
    raise SystemExit("run scripts/logit_diag.py")
