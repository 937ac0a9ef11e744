"""Kernel layer tests: every ISA this machine runs vs numpy references.

The numpy side (bitdlm.packing) is the oracle for the packed layout and the
int32 products; transformers' ActQuant is the oracle for the quantizer.
"""
from __future__ import annotations

import os
import platform

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import numpy as np
import pytest

from bitdlm import _core
from bitdlm.packing import act_quant, pack_i2, pad_k

ISAS = list(_core.supported_isas())
# the ISA names of this build's architecture (the other's are unknown names);
# aarch64: under emulation, scripts/arm_emulated_install.sh
ARM = platform.machine() in ("aarch64", "arm64")
LEVELS = ("scalar", "neon", "dotprod", "i8mm") if ARM else ("scalar", "avx2", "avx512", "avx512vnni", "amx")
# csrc/bench/ compiled in (BITDLM_BENCH_KERNELS=1 scripts/dev_build.sh; never in the shipped module)
BENCH = bool(_core.build_info().get("bench_kernels"))
# The shipped AMX kernel (None), plus in bench builds the variants bench/amx_sweep.py
# measures (csrc/bench/amx_variants_amx.cpp bit flags: each alone and the combinations
# the kernel distinguishes)
AMX_VARIANTS = [None] + ([0, 1, 1 | 8, 1 | 16, 1 | 8 | 16, 32, 32 | 8 | 16, 64, 64 | 8 | 16,
                          128 | 49, 256 | 128 | 49, 128 | 64 | 8, 128] if BENCH else [])
_BENCH_NAMES = ("bench_peak_int8", "bench_peak_vnni", "bench_peak_amx", "bench_bandwidth", "set_amx_variant",
                "get_amx_variant", "bench_gemm_multi", "bench_amx_overheads")
# bench builds: bench_gemm_multi's kernels bench/amx_sweep.py times: the shipped VNNI tiles through
# its job loop and the AMX call without per-call tile config / re-layout barrier
BENCH_MULTI = ["vnni", "amx", "amx_keepcfg", "amx_serialact", "amx_keepcfg_serialact"]


def test_bench_kernels_only_in_bench_builds():
    """The shipped module has one kernel per ISA and shape class: the machine-ceiling kernels and
    the AMX tuning variants exist only when csrc/bench/ was compiled in."""
    assert {n: hasattr(_core, n) for n in _BENCH_NAMES} == {n: BENCH for n in _BENCH_NAMES}


class amx_variant:
    """Run the AMX GEMMs through bench variant v (None: the shipped kernel) inside the block."""

    def __init__(self, v):
        self.v = v

    def __enter__(self):
        if self.v is not None:
            _core.set_amx_variant(self.v)

    def __exit__(self, *exc):
        if self.v is not None:
            _core.set_amx_variant(49)  # the shipped kernel again (kAmxShipped: dispatch's own kernel)


@pytest.fixture(params=ISAS)
def isa(request):
    prev = _core.active_isa()
    _core.set_isa(request.param)
    yield request.param
    _core.set_isa(prev)


def _ref_act(x):
    """numpy ActQuant -> the kernel's ActQ arrays (codes padded to Kp, sums)."""
    q, s = act_quant(x)
    n, k = q.shape
    qp = np.zeros((n, pad_k(k)), np.int8)
    qp[:, :k] = q
    return qp, s.astype(np.float32), q.astype(np.int32).sum(axis=1).astype(np.int32)


# ---------------------------------------------------------------- lm_head GEMMs


def _f16_bits_with_specials(rng, m, k):
    w = (rng.standard_normal((m, k)) * 0.5).astype(np.float16)
    return w


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 13, 3), (64, 2560, 1), (67, 259, 8), (130, 136, 33),
                                   (21, 3300, 5), (13, 6500, 9)])  # last two: K-sliced tiles
def test_gemm_f16(isa, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    w = _f16_bits_with_specials(rng, m, k)
    # subnormal halves must be converted exactly (no F16C in baseline code)
    w.flat[:: max(1, w.size // 7)] = np.float16(3e-6)
    x = rng.standard_normal((n, k)).astype(np.float32)
    y = _core.gemm_f16(w.view(np.uint16), x)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    tol = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T) + 1e-30
    assert y.shape == (n, m) and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= tol)


def test_gemm_f16_special_values(isa):
    # one weight per row: the result is that weight times 1.0, so the fp16 ->
    # fp32 conversion of every special pattern is observed exactly.
    bits = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x8001, 0x0400, 0x3C00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00],
                    np.uint16)
    w = np.zeros((bits.size, 3), np.uint16)
    w[:, 1] = bits
    x = np.array([[0.0, 1.0, 0.0]], np.float32)
    y = _core.gemm_f16(w, x)[0]
    np.testing.assert_array_equal(y, bits.view(np.float16).astype(np.float32))
    nan = _core.gemm_f16(np.array([[0x7E00]], np.uint16), np.ones((1, 1), np.float32))
    assert np.isnan(nan).all()


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 33, 2), (64, 2560, 1), (67, 300, 8), (129, 257, 33),
                                   (20, 4000, 9), (11, 7000, 5)])  # last two: K-sliced tiles
def test_gemm_i8(isa, m, k, n):
    rng = np.random.default_rng(m + 7 * k + n)
    w = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    w[0, 0] = -128
    wscale = rng.uniform(0.001, 0.1, size=m).astype(np.float32)
    x = rng.standard_normal((n, k)).astype(np.float32)
    q, s, _ = _ref_act(x)
    y = _core.gemm_i8(w, wscale, q, s)
    dots = q[:, :k].astype(np.int64) @ w.astype(np.int64).T
    # same float expression as the kernels: (float)dot * wscale[m] / s[n]
    ref = (dots.astype(np.float32) * wscale[None, :]) / s[:, None]
    np.testing.assert_array_equal(y, ref.astype(np.float32))


def test_gemm_i8_rejects_bad_input():
    w = np.zeros((4, 10), np.int8)
    with pytest.raises(ValueError):
        _core.gemm_i8(w, np.ones(4, np.float32), np.zeros((1, 10), np.int8), np.ones(1, np.float32))
    q = np.zeros((1, 128), np.int8)
    q[0, 3] = -128
    with pytest.raises(ValueError):
        _core.gemm_i8(w, np.ones(4, np.float32), q, np.ones(1, np.float32))
    with pytest.raises(ValueError):
        _core.gemm_f16(np.zeros((4, 10), np.uint16), np.zeros((2, 11), np.float32))


# ---------------------------------------------------------------- ternary GEMM


def _ternary_case(rng, m, k, n):
    codes = rng.integers(-1, 2, size=(m, k), dtype=np.int8)
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[:, :: max(1, k // 5)] *= 9.0  # outliers: codes hit +-127
    q, s, sums = _ref_act(x)
    return codes, pack_i2(codes), q, s, sums


@pytest.mark.parametrize("n", [1, 2, 3, 8, 31, 32, 33, 128])
@pytest.mark.parametrize("m,k", [(1, 1), (3, 130), (17, 257), (64, 384)])
def test_gemm_i32_exact(isa, m, k, n):
    rng = np.random.default_rng(1000 * m + 10 * k + n)
    codes, w, q, s, sums = _ternary_case(rng, m, k, n)
    out = _core.gemm_i32(w, q, sums)
    ref = q[:, :k].astype(np.int64) @ codes.astype(np.int64).T
    assert out.shape == (n, m) and out.dtype == np.int32
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("m,k,n", [(640, 2560, 1), (66, 2560, 8), (40, 6912, 33), (37, 6912, 13), (33, 4096, 8)])
def test_gemm_i32_bitnet_k(isa, m, k, n):
    rng = np.random.default_rng(m + k + n)
    codes, w, q, s, sums = _ternary_case(rng, m, k, n)
    np.testing.assert_array_equal(_core.gemm_i32(w, q, sums), q[:, :k].astype(np.int64) @ codes.astype(np.int64).T)


@pytest.mark.parametrize("m,k", [(45, 257), (17, 64), (33, 1000)])
def test_gemm_i32_every_token_count(isa, m, k):
    # N = 1..40: every register/AMX tile tail (2, 3, 15, 16, 17, 33, ...); M, K tails
    rng = np.random.default_rng(m * k)
    codes, w, q, s, sums = _ternary_case(rng, m, k, 40)
    codes[0] = -1  # all -1 / all +1 rows
    codes[-1] = 1
    w = pack_i2(codes)
    ref = q[:, :k].astype(np.int64) @ codes.astype(np.int64).T
    for n in range(1, 41):
        np.testing.assert_array_equal(_core.gemm_i32(w, q[:n], sums[:n]), ref[:n], err_msg=f"N={n}")


def test_gemm_i32_extremes(isa):
    # worst case for int16 partial sums: every code 2 (t = +1) against -128 / 127
    k, m = 6912, 5
    codes = np.ones((m, k), np.int8)
    codes[1] = -1
    for fill in (-128, 127):
        q = np.full((3, pad_k(k)), fill, np.int8)
        q[:, k:] = 0
        sums = q.astype(np.int32).sum(axis=1).astype(np.int32)
        ref = q[:, :k].astype(np.int64) @ codes.astype(np.int64).T
        np.testing.assert_array_equal(_core.gemm_i32(pack_i2(codes), q, sums), ref)
        # one token: the decode tile (AVX2: groups 1 and 3 x 4 in an int16 accumulator of their own,
        # at -128 exactly its bound, -32768 after kChunk blocks)
        np.testing.assert_array_equal(_core.gemm_i32(pack_i2(codes), q[:1], sums[:1]), ref[:1])


@pytest.mark.parametrize("m,k,n", [(5, 200, 1), (64, 2560, 8), (33, 300, 33), (130, 384, 70)])
def test_gemm_dequant(isa, m, k, n):
    rng = np.random.default_rng(3 * m + k + n)
    codes, w, q, s, sums = _ternary_case(rng, m, k, n)
    ws = np.float32(1.7)
    y = _core.gemm(w, float(ws), q, s, sums)
    dots = (q[:, :k].astype(np.int64) @ codes.astype(np.int64).T).astype(np.float32)
    ref = dots / (ws * s[:, None])  # the kernels' exact float expression
    np.testing.assert_array_equal(y, ref.astype(np.float32))


def test_isas_agree_with_threads():
    # the same call on every ISA and 1 / 2 threads gives bit-identical floats
    rng = np.random.default_rng(5)
    codes, w, q, s, sums = _ternary_case(rng, 2560, 2560, 9)
    prev, prev_threads = _core.active_isa(), _core.get_max_threads()
    outs = []
    try:
        for name in ISAS:
            _core.set_isa(name)
            for t in (1, 2):
                _core.set_num_threads(t)
                outs.append(_core.gemm(w, 0.5, q, s, sums))
    finally:
        _core.set_isa(prev)
        _core.set_num_threads(prev_threads)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_jobs_of_absent_threads_are_stolen(tmp_path):
    """JobRanges (kernels/job_ranges.h) cuts a call's jobs into one range per thread the call may
    get (omp_get_max_threads); when the team is smaller (OMP_THREAD_LIMIT, a busy machine's dynamic
    teams) the ranges of threads that never come are taken by the others: the GEMMs, the int8
    lm_head and attention still compute every output, as on one thread."""
    code = """
import numpy as np
from bitdlm import _core
from bitdlm.packing import pack_i2
rng = np.random.default_rng(3)
k = 2560
x = rng.standard_normal((9, k)).astype(np.float32)
q, s, sums = _core.quantize_act(x)
codes = [rng.integers(-1, 2, size=(m, k), dtype=np.int8) for m in (640, 2560)]
w8 = rng.integers(-127, 128, size=(3000, k), dtype=np.int8)
ws8 = np.full(3000, 0.01, np.float32)
nh, nkv, hd, n, ctx = 20, 5, 64, 8, 300
kc, vc = (rng.standard_normal((1, nkv, ctx + n, hd)).astype(np.float32) for _ in range(2))
qa = rng.standard_normal((n, nh * hd)).astype(np.float32)
ka, va = (rng.standard_normal((n, nkv * hd)).astype(np.float32) for _ in range(2))
def run():
    return (_core.gemm_multi([pack_i2(c) for c in codes], [0.5, 2.0], q, s, sums)
            + [_core.gemm_i8(w8, ws8, q, s)] + [_core.attention(qa, ka, va, kc, vc, ctx, ctx, 32),
                                                 _core.attention(qa[:1], ka[:1], va[:1], kc, vc, ctx, ctx, 1)])
_core.set_num_threads(1)
one = run()
_core.set_num_threads(16)  # 16 ranges, a team of at most 2 (OMP_THREAD_LIMIT)
many = run()
assert all(np.array_equal(a, b) for a, b in zip(one, many))
print("ok", _core.get_max_threads())
"""
    import subprocess
    import sys

    from hf_models import child_env

    r = subprocess.run([sys.executable, "-c", code], env=child_env(OMP_THREAD_LIMIT=2), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-3000:]


def test_gemm_multi_two_threads(isa):
    # several matrices in one parallel region, N > 64 (token chunks) and the
    # K-blocked path (K = 6912), on 2 threads
    rng = np.random.default_rng(11)
    k, n = 6912, 70
    x = rng.standard_normal((n, k)).astype(np.float32)
    q, s, sums = _core.quantize_act(x)
    codes = [rng.integers(-1, 2, size=(m, k), dtype=np.int8) for m in (33, 64, 7)]
    scales = [0.5, 1.25, 3.0]
    prev = _core.get_max_threads()
    _core.set_num_threads(2)
    try:
        ys = _core.gemm_multi([pack_i2(c) for c in codes], scales, q, s, sums)
    finally:
        _core.set_num_threads(prev)
    for c, ws, y in zip(codes, scales, ys):
        dots = (q[:, :k].astype(np.int64) @ c.astype(np.int64).T).astype(np.float32)
        np.testing.assert_array_equal(y, (dots / (np.float32(ws) * s[:, None])).astype(np.float32))


def test_gemm_rejects_bad_shapes():
    with pytest.raises(ValueError):
        _core.gemm_i32(np.zeros((4, 31), np.uint8), np.zeros((1, 128), np.int8), np.zeros(1, np.int32))
    with pytest.raises(ValueError):
        _core.gemm_i32(np.zeros((4, 32), np.uint8), np.zeros((1, 100), np.int8), np.zeros(1, np.int32))
    with pytest.raises(ValueError):
        _core.gemm_i32(np.zeros((4, 32), np.uint8), np.zeros((2, 128), np.int8), np.zeros(1, np.int32))


# ---------------------------------------------------------------- quantizer


def test_quantize_act_matches_numpy_reference(isa):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    x[4] = 0.0  # absmax clamp to 1e-5
    x[5] = np.arange(300) - 149.5  # absmax 150.5: many products land near .5 ties
    q, s, sums = _core.quantize_act(x)
    rq, rs, rsums = _ref_act(x)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(sums, rsums)
    assert q.min() >= -127  # i8 lm_head kernels rely on it


@pytest.mark.parametrize("k", [1, 7, 8, 31, 33, 129, 6912])
def test_quantize_act_odd_widths(isa, k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((3, k)) * 10).astype(np.float32)
    q, s, sums = _core.quantize_act(x)
    rq, rs, rsums = _ref_act(x)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(sums, rsums)


def test_quantize_act_matches_transformers(isa):
    torch = pytest.importorskip("torch")
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 2560)) * 2).astype(np.float32)
    # exact .5 ties after scaling: absmax 127 -> scale 1, so x itself is rounded
    x[5] = rng.integers(-254, 255, size=2560) / 2.0
    x[5, 0] = 127.0
    x[4, :] = 0.0
    x[3, :7] = [1e-8, -1e-8, 0.0, 2.5e-6, -3e-6, 5e-6, 1e-6]  # clamp branch, amax < 1e-5
    x[3, 7:] = 0.0
    q, s, sums = _core.quantize_act(x)
    xt = torch.from_numpy(x)
    ref = _transformers_act_codes(torch, bitnet, xt)
    np.testing.assert_array_equal(q[:, : x.shape[1]], ref)
    assert (q[:, x.shape[1]:] == 0).all()
    ties = np.abs(x[5] - np.trunc(x[5])) == 0.5
    assert ties.sum() > 100 and (np.abs(q[5, :2560][ties]) % 2 == 0).all()  # half to even


def test_quantize_act_scale_is_transformers_scale(isa):
    """The per-token scale equals transformers' `127 / amax` as torch evaluates it
    (amax.reciprocal() * 127) bit for bit: a true division differs in the last bit for
    about a quarter of the rows, which flips codes that lie on a round-half tie."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2000, 72)) * rng.uniform(1e-3, 30, (2000, 1))).astype(np.float32)
    _, s, _ = _core.quantize_act(x)
    xt = torch.from_numpy(x)
    ref = (127 / xt.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5))[:, 0].numpy()
    np.testing.assert_array_equal(s, ref)
    assert (np.float32(127.0) / np.abs(x).max(-1) != ref).mean() > 0.1  # (the division would not do)


def _transformers_act_codes(torch, bitnet, xt):
    """int8 codes of transformers' BitNet activation quantizer, two ways."""
    # BitLinear.activation_quant returns the int8 codes directly (self unused)
    codes, _ = bitnet.BitLinear.activation_quant(None, xt, 8)
    # ActQuant (the autograd path) returns codes / scale; recover the integers
    y = bitnet.ActQuant.apply(xt)
    scale = 127.0 / xt.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    codes2 = torch.round(y * scale).to(torch.int8)
    assert torch.equal(codes.to(torch.int8), codes2)
    return codes.to(torch.int8).numpy()
# ---------------------------------------------------------------- dispatch


def test_set_isa_errors():
    with pytest.raises(ValueError, match="unknown ISA"):
        _core.set_isa("avx2" if ARM else "neon")
    for name in LEVELS:
        if name not in ISAS:
            with pytest.raises(ValueError, match="not supported"):
                _core.set_isa(name)
    assert "scalar" in ISAS


def test_bitdlm_isa_env_override():
    import subprocess
    import sys

    code = "from bitdlm import _core; print(_core.active_isa())"
    from hf_models import child_env

    env = child_env()
    for name in ISAS:
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, BITDLM_ISA=name), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == name, out.stderr
    bad = subprocess.run([sys.executable, "-c", code], env=dict(env, BITDLM_ISA="avx9000"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "BITDLM_ISA" in bad.stderr and "avx9000" in bad.stderr
    best = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in env.items() if k != "BITDLM_ISA"},
                          capture_output=True, text=True, timeout=60)
    assert best.stdout.strip() == ISAS[-1]


@pytest.mark.skipif(not BENCH, reason="needs a bench build (BITDLM_BENCH_KERNELS=1)")
@pytest.mark.parametrize("kernel", BENCH_MULTI)
@pytest.mark.parametrize("n", [8, 13, 16, 24, 32, 33, 64, 70])
def test_bench_multi_kernels_bit_exact_vs_scalar(n, kernel):
    """Natively: bench_gemm_multi's kernels (the shipped VNNI tiles; the shipped AMX kernel with
    the tile config kept across calls / the re-layout before the parallel region), 2 threads, give
    the scalar floats bit for bit (y = dot / s_a with |dot| < 2^21, so equal floats mean equal int32
    dots), several matrices in one call, K with slices. Elsewhere the SIMDe harness checks the VNNI
    tiles and the AMX kernel."""
    need = "amx" if kernel.startswith("amx") else "avx512vnni"
    if need not in ISAS:
        pytest.skip(f"needs the {need} ISA (checked under SIMDe elsewhere)")
    rng = np.random.default_rng(n)
    k = 6912 if n in (16, 33) else 2560
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[:, ::97] *= 9.0
    q, s, sums = _ref_act(x)
    mats = [pack_i2(rng.integers(-1, 2, size=(m, k), dtype=np.int8)) for m in (45, 17, 96)]
    prev, prev_threads = _core.active_isa(), _core.get_max_threads()
    try:
        _core.set_isa("scalar")
        ref = _core.gemm_multi(mats, [1.0] * 3, q, s, sums)
        _core.set_num_threads(2)
        got = _core.bench_gemm_multi(kernel, mats, [1.0] * 3, q, s, sums)
        if kernel.startswith("amx"):  # again after a shipped AMX call released the tiles
            _core.set_isa("amx")
            _core.gemm_multi(mats, [1.0] * 3, q, s, sums)
            again = _core.bench_gemm_multi(kernel, mats, [1.0] * 3, q, s, sums)
            for a, b in zip(got, again):
                np.testing.assert_array_equal(a, b)
    finally:
        _core.set_isa(prev)
        _core.set_num_threads(prev_threads)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- AMX

_NO_AMX = "this CPU has no AMX-INT8 (or Linux refused the tile state); the AMX kernel is checked under SIMDe + emulation"


@pytest.mark.native
@pytest.mark.skipif("amx" not in ISAS, reason=_NO_AMX)
@pytest.mark.parametrize("variant", AMX_VARIANTS)
@pytest.mark.parametrize("n", [2, 3, 15, 16, 17, 32, 33, 64, 65, 130])
def test_amx_multi_gemm_bit_exact_vs_scalar(n, variant):
    """Native AMX (several matrices in one call, 2 threads; in bench builds every kernel variant)
    == scalar, int32 and dequantized floats."""
    rng = np.random.default_rng(n)
    shapes = [(45, 2560), (17, 2560), (640, 2560)]
    k = 2560
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[:, ::97] *= 9.0
    q, s, sums = _ref_act(x)
    mats = [pack_i2(rng.integers(-1, 2, size=(m, k), dtype=np.int8)) for m, _ in shapes]
    prev, prev_threads = _core.active_isa(), _core.get_max_threads()
    prev_min = _core.amx_min_tokens()
    try:
        outs = {}
        _core.set_amx_min_tokens(2)  # AMX for every n here (the default sends small n to VNNI)
        for name in ("scalar", "amx"):
            _core.set_isa(name)
            _core.set_num_threads(2)
            with amx_variant(variant):
                outs[name] = ([_core.gemm_i32(w, q, sums) for w in mats],
                              _core.gemm_multi(mats, [1.3] * 3, q, s, sums))
    finally:
        _core.set_isa(prev)
        _core.set_num_threads(prev_threads)
        _core.set_amx_min_tokens(prev_min)
    for a, b in zip(outs["scalar"][0], outs["amx"][0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(outs["scalar"][1], outs["amx"][1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.native
@pytest.mark.skipif("amx" not in ISAS, reason=_NO_AMX)
@pytest.mark.parametrize("m,k,n", [(300, 2560, 1), (16, 2560, 2), (100, 2560, 8), (300, 640, 33), (1000, 2560, 17), (77, 320, 64)])
def test_amx_i8_lm_head_bit_exact_vs_scalar(m, k, n):
    """Native AMX int8 lm_head (TDPBSSD tiles, the M % 16 tail on VNNI) == scalar, 2 threads
    (N <= 16 and N > 16 take the kernel's two prefetch schemes)."""
    rng = np.random.default_rng(m + k + n)
    w = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    wscale = rng.uniform(0.001, 0.1, size=m).astype(np.float32)
    q, s, _ = _ref_act(rng.standard_normal((n, k)).astype(np.float32))
    prev, prev_threads = _core.active_isa(), _core.get_max_threads()
    prev_min = _core.amx_min_tokens()
    try:
        _core.set_amx_min_tokens(2)
        _core.set_num_threads(2)
        outs = {}
        for name in ("scalar", "amx"):
            _core.set_isa(name)
            outs[name] = _core.gemm_i8(w, wscale, q, s)
    finally:
        _core.set_isa(prev)
        _core.set_num_threads(prev_threads)
        _core.set_amx_min_tokens(prev_min)
    np.testing.assert_array_equal(outs["scalar"], outs["amx"])


def test_bitdlm_isa_amx_clear_error_without_amx():
    import subprocess
    import sys

    if ARM:
        pytest.skip("x86-64 only (tests/test_arm.py checks the aarch64 refusals)")
    if "amx" in ISAS:
        pytest.skip("this CPU runs AMX (the error path is for CPUs without it)")
    from hf_models import child_env

    code = "from bitdlm import _core; print(_core.active_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(child_env(), BITDLM_ISA="amx"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert "ISA 'amx' is not supported by this CPU" in out.stderr
    assert "cpuid has no" in out.stderr or "Linux refused AMX state" in out.stderr
    with pytest.raises(ValueError, match="amx"):
        _core.set_isa("amx")


# ---------------------------------------------------------------- AVX-512 via SIMDe

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SIMDE_SOURCES = ["tests/simde/harness.cpp", "csrc/kernels/gemm_avx512.cpp", "csrc/kernels/gemm_avx512vnni.cpp",
                  "csrc/kernels/gemm_amx.cpp", "csrc/bench/amx_variants_amx.cpp",
                  "csrc/kernels/gemm_scalar.cpp"]
_SIMDE_HEADERS = ["csrc/kernels/gemm_avx512.inc", "csrc/kernels/simd512.h", "csrc/kernels/isa.h",
                  "csrc/kernels/ternary_driver.h", "csrc/kernels/lm_driver.h", "csrc/kernels/epilogue.h",
                  "csrc/kernels/amx_tiles.h", "tests/kernel_checks.h",
                  "csrc/kernels/gemm.h", "csrc/bench/amx_variants.h"]


@pytest.mark.slow
def test_avx512_kernels_bit_exact_via_simde(tmp_path_factory):
    """The AVX-512 (BW and VNNI) kernels, compiled against SIMDe without any
    -mavx512 flag, agree bit for bit with the scalar reference."""
    from helpers import run_simde_harness

    out = run_simde_harness("simde", _SIMDE_SOURCES, _SIMDE_HEADERS, tmp_path_factory,
                            includes=("tests/simde/amx_emu.h",))
    assert out.strip().splitlines()[-1].startswith("OK"), out[-4000:]
    assert " 0 failed" in out
