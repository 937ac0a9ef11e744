"""attention() alone (_core.attention): against a float64 reference, and bit-identical for any thread count
(each job's keys are cut into units by the job alone, the partials merge in key order)."""
import numpy as np
import pytest

from bitdlm import _core


def reference(q, k, v, kc, vc, start, ctx, B, nkv, hd):
    """Block-causal softmax attention in float64 (p sees q iff q // B <= p // B), one sequence."""
    n, nh = q.shape[0], q.shape[1] // hd
    g = nh // nkv
    out = np.zeros(q.shape)
    for i in range(n):
        end = ((start + i) // B + 1) * B
        lim = min(ctx, end)
        cached = [j for j in range(min(lim, start))] + [j for j in range(start + n, lim)]
        nf = min(n, end - start)
        for h in range(nh):
            kh = h // g
            K = np.concatenate([kc[kh, cached], k[:nf, kh * hd:(kh + 1) * hd]]).astype(np.float64)
            V = np.concatenate([vc[kh, cached], v[:nf, kh * hd:(kh + 1) * hd]]).astype(np.float64)
            s = K @ q[i, h * hd:(h + 1) * hd] / np.sqrt(hd)
            w = np.exp(s - s.max())
            out[i, h * hd:(h + 1) * hd] = w @ V / w.sum()
    return out


# (query heads, KV heads, head_dim), (queries, cached, B): decoding (direct kernels), 8 / 32 queries
# (tiles), several units per job (units of >= 64 keys), odd head_dim, 128 rows per job (AVX-512:
# two chunks of 64 lanes), head_dim 13 (the lanes paths' one-dim and one-key register tiles)
CASES = [((8, 2, 32), (1, 300, 1)), ((8, 2, 32), (8, 300, 32)), ((6, 2, 12), (32, 200, 32)),
         ((20, 5, 128), (8, 520, 32)), ((4, 4, 16), (5, 150, 2)), ((32, 2, 16), (8, 100, 32)),
         ((4, 2, 13), (8, 91, 32)),
         # block size 1 (causal prefill): jobs of up to 8 queries with per-row key limits on the
         # lanes paths, split into units (several keys before the fresh ones) or not (none cached),
         # a prompt cut mid-job (19 = 2 x 8 + 3), 3 query heads per KV head (6 rows a query
         # pair), and 2 (the 1-query kernels)
         ((20, 5, 128), (19, 300, 1)), ((8, 2, 32), (16, 0, 1)), ((6, 2, 12), (11, 70, 1)),
         ((4, 2, 16), (9, 40, 1)),
         # block size 4: a job of 8 queries spans two blocks (limits 4 and 8 fresh keys)
         ((8, 2, 32), (16, 60, 4))]


def make(rng, heads, case, f16):
    (nh, nkv, hd), (n, ctx, B) = heads, case
    cap = ctx + n
    kc = rng.standard_normal((1, nkv, cap, hd)).astype(np.float32)
    vc = rng.standard_normal((1, nkv, cap, hd)).astype(np.float32)
    if f16:
        kc, vc = kc.astype(np.float16), vc.astype(np.float16)
    q = rng.standard_normal((n, nh * hd)).astype(np.float32)
    k = rng.standard_normal((n, nkv * hd)).astype(np.float32)
    v = rng.standard_normal((n, nkv * hd)).astype(np.float32)
    return q, k, v, kc, vc


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("heads,case", CASES)
def test_attention_matches_reference_and_thread_counts(heads, case, f16):
    nkv, hd = heads[1], heads[2]
    n, ctx, B = case
    q, k, v, kc, vc = make(np.random.default_rng(n + ctx), heads, case, f16)
    ref = reference(q, k, v, kc[0].astype(np.float32), vc[0].astype(np.float32), ctx, ctx, B, nkv, hd)
    kcs, vcs = (kc.view(np.uint16), vc.view(np.uint16)) if f16 else (kc, vc)
    old = _core.get_max_threads()
    try:
        for isa in _core.supported_isas():
            outs = []
            for th in (1, 2, 3, 7, 16):
                _core.set_num_threads(th)
                outs.append(_core.attention(q, k, v, kcs, vcs, ctx, ctx, B, isa))
            np.testing.assert_allclose(outs[0], ref, rtol=1e-5, atol=2e-5, err_msg=isa)
            for th, o in zip((2, 3, 7, 16), outs[1:]):
                assert np.array_equal(o, outs[0]), f"{isa}: {th} threads differ from 1"
    finally:
        _core.set_num_threads(old)


def test_attention_bad_arguments():
    q, k, v, kc, vc = make(np.random.default_rng(0), (8, 2, 32), (1, 10, 1), False)
    with pytest.raises(ValueError):
        _core.attention(q, k, v, kc, vc, 10, 12, 1)  # ctx_len past the cache
    with pytest.raises(ValueError):
        _core.attention(q, k[:, :32], v, kc, vc, 10, 10, 1)  # k not [n, n_kv * hd]
    with pytest.raises(ValueError):
        _core.attention(q, k, v, kc, vc, 10, 10, 1, "sse9")
