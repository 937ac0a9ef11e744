// Attention hot loops with AVX-512 F/BW/VL/DQ (compiled with those flags only).
// Jobs of 5+ rows (8-32 queries) run the rows-in-lanes path (seg_lanes_*,
// to_lanes / from_lanes / merge_lanes; docs/architecture.md "Attention"):
// attention_lanes.inc, shared with AVX2, on the zmm traits `Lanes` below:
// Q transposed once per unit, K / V elements broadcast against 16-row
// vectors. Decoding (R <= 4) runs the row-major qk_direct, softmax_tile and
// pv here, 16 lanes wide with masked tails; attention.cpp fills every entry
// this table leaves null from kAttnAvx2.
// GCC 12 warns "__Y is used uninitialized" inside its own AVX-512 intrinsics
// (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels/simd512.h"  // intrinsics, or SIMDe in tests/simde/attention_harness.cpp

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels/isa.h"
#include "model/attention.h"
#include "model/prefetch.h"
#include "model/row_blocks.h"

namespace bitdlm {
namespace avx512 {

static inline __mmask16 tail_mask(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// exp for x <= 0: the same range reduction and polynomial as avx2::exp_neg
// (simd_avx2.h), bit for bit: lanes below -60 are 0 (so AVX2's clamp at -88
// is not needed: -inf's NaN is masked too), and 2^n (n >= -87 elsewhere) is
// applied by vscalefps, exact as AVX2's multiply by the exponent bits.
static inline __m512 exp_neg(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-60.0f), _CMP_LT_OQ);
  const __m512 fx = _mm512_floor_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)));
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps((__mmask16)~tiny, y, fx);
}

// Decoding (R <= 4 rows): the online softmax and values row-major, 16 lanes wide.
static void softmax_tile(float* S, int64_t lds, int R, int n, float* m, float* l, float* O, int d) {
  for (int r = 0; r < R; ++r) {
    float* s = S + r * lds;
    __m512 vm = _mm512_set1_ps(m[r]);
    for (int j = 0; j < n; j += 16) {
      const __mmask16 k = tail_mask(n - j);
      vm = _mm512_mask_max_ps(vm, k, vm, _mm512_maskz_loadu_ps(k, s + j));
    }
    const float mx = _mm512_reduce_max_ps(vm);
    const float alpha = m[r] == -INFINITY ? 0.f : std::exp(m[r] - mx);
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vs = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
      const __mmask16 k = tail_mask(n - j);
      const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vmx));
      _mm512_mask_storeu_ps(s + j, k, e);
      vs = _mm512_mask_add_ps(vs, k, vs, e);
    }
    l[r] = l[r] * alpha + _mm512_reduce_add_ps(vs);
    m[r] = mx;
    if (alpha != 1.f) {
      float* o = O + (int64_t)r * d;
      const __m512 va = _mm512_set1_ps(alpha);
      for (int i = 0; i < d; i += 16) {
        const __mmask16 k = tail_mask(d - i);
        _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, o + i), va));
      }
    }
  }
}

// Scores straight from K rows for R <= 4 rows (decoding: one query's heads of
// a KV head), in AVX2's summation order bit for bit (attention_avx2.cpp
// qk_direct; test_isa_forward compares the two groups' logits), at half its
// instructions: a zmm holds two keys' 8-dim chunks (lanes 0-7: key j, 8-15:
// key j + 1) against a query chunk broadcast to both halves, so each lane
// accumulates exactly what AVX2's ymm lane does; the reductions below repeat
// AVX2's hadd / hsum steps per 128-bit chunk.
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) { return half_to_float(*p); }
static inline __m512 pair8(const float* k0, const float* k1) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(k0)), _mm256_loadu_ps(k1), 1);
}
static inline __m512 pair8(const uint16_t* k0, const uint16_t* k1) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(k0));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(k1));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
}
// _mm256_hadd_ps per 256-bit half: [a0+a1, a2+a3, b0+b1, b2+b3] per 128-bit chunk.
static inline __m512 hadd(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
}

// R == 4, d % 8 == 0 (AVX2's 2-key x 4-row path): NP pairs of keys (2 x NP
// keys, 4 x NP accumulation chains).
template <int NP, class T>
static inline void qk_pairs_rows4(const float* Q, const T* K, int64_t ld, int d, float scale, float* S, int64_t lds) {
  __m512 a[NP][4];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) a[p][r] = _mm512_setzero_ps();
  prefetch_rows(K + kAttnPrefetchRows * ld, ld, 2 * NP, d);
  for (int i = 0; i < d; i += 8) {
    __m512 x[NP];
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) x[p] = pair8(K + 2 * p * ld + i, K + (2 * p + 1) * ld + i);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m512 q = _mm512_broadcast_f32x8(_mm256_loadu_ps(Q + (int64_t)r * d + i));
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) a[p][r] = _mm512_fmadd_ps(q, x[p], a[p][r]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  alignas(64) float s[NP][16];
#pragma GCC unroll 2
  for (int p = 0; p < NP; ++p) {  // AVX2's hsum4: hadd(hadd(r0, r1), hadd(r2, r3)), then low + high 128
    const __m512 h = hadd(hadd(a[p][0], a[p][1]), hadd(a[p][2], a[p][3]));
    _mm512_store_ps(s[p], _mm512_mul_ps(_mm512_add_ps(h, _mm512_shuffle_f32x4(h, h, 0xB1)), sc));
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)  // chunk 0: key 2p, chunk 2: key 2p + 1; lane r (+ 8): row r
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) S[r * lds + 2 * p] = s[p][r], S[r * lds + 2 * p + 1] = s[p][8 + r];
}

// One row against keys k0 and k1 (AVX2's one-dot-product path, d % 8 == 0):
// AVX2's hsum = (low + high 128), + movehl, + movehdup, per key.
template <class T>
static inline void qk_row_pair(const float* q, const T* k0, const T* k1, int d, float scale, float* s0, float* s1) {
  __m512 a = _mm512_setzero_ps();
  for (int i = 0; i < d; i += 8)
    a = _mm512_fmadd_ps(_mm512_broadcast_f32x8(_mm256_loadu_ps(q + i)), pair8(k0 + i, k1 + i), a);
  a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, 0xB1));
  a = _mm512_add_ps(a, _mm512_shuffle_ps(a, a, 0xEE));
  a = _mm512_add_ps(a, _mm512_shuffle_ps(a, a, 0xF5));
  alignas(64) float t[16];
  _mm512_store_ps(t, a);
  *s0 = t[0] * scale;
  if (s1) *s1 = t[8] * scale;
}

template <class T>
static void qk_direct(const float* Q, int R, const T* K, int64_t ld, int nk, int d, float scale, float* S,
                      int64_t lds) {
  if (d % 8) {  // (no model has such heads) plain loops, one dot product at a time
    for (int j = 0; j < nk; ++j)
      for (int r = 0; r < R; ++r) {
        float x = 0.f;
        for (int i = 0; i < d; ++i) x += Q[(int64_t)r * d + i] * load1(K + j * ld + i);
        S[r * lds + j] = x * scale;
      }
    return;
  }
  int j = 0;
  if (R == 4) {
    for (; j + 4 <= nk; j += 4) qk_pairs_rows4<2, T>(Q, K + j * ld, ld, d, scale, S + j, lds);
    if (j + 2 <= nk) qk_pairs_rows4<1, T>(Q, K + j * ld, ld, d, scale, S + j, lds), j += 2;
  } else {
    for (; j + 2 <= nk; j += 2) {
      prefetch_rows(K + (j + kAttnPrefetchRows) * ld, ld, 2, d);
      for (int r = 0; r < R; ++r)
        qk_row_pair(Q + (int64_t)r * d, K + j * ld, K + (j + 1) * ld, d, scale, S + r * lds + j, S + r * lds + j + 1);
    }
  }
  if (j < nk)  // the odd last key: AVX2's one-dot-product reduction
    for (int r = 0; r < R; ++r)
      qk_row_pair(Q + (int64_t)r * d, K + j * ld, K + j * ld, d, scale, S + r * lds + j, (float*)nullptr);
}

// O[r][0..16*NV) += sum_j P[r][j] V[j][..] for RT rows; the last vector masked by `last`.
template <int RT, int NV, class T>
static inline void pv_tile(const float* P, int64_t ldp, const T* V, int64_t ldv, int nk, int d, float* O,
                           __mmask16 last, int pf) {
  __m512 acc[RT][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_maskz_loadu_ps(c == NV - 1 ? last : 0xFFFF, O + (int64_t)r * d + 16 * c);
  for (int j = 0; j < nk; ++j) {
    if (pf) prefetch_rows(V + (j + kAttnPrefetchRows) * ldv, ldv, 1, pf);
    __m512 vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = load16(V + j * ldv + 16 * c, c == NV - 1 ? last : 0xFFFF);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const __m512 pb = _mm512_set1_ps(P[r * ldp + j]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c)
      _mm512_mask_storeu_ps(O + (int64_t)r * d + 16 * c, c == NV - 1 ? last : 0xFFFF, acc[r][c]);
}

template <int RT, class T>
static inline void pv_rows(const float* P, int64_t ldp, const T* V, int64_t ldv, int nk, int d, float* O) {
  int i = 0;  // the first pass over the keys prefetches whole V rows ahead
  for (; i + 64 <= d; i += 64) pv_tile<RT, 4, T>(P, ldp, V + i, ldv, nk, d, O + i, 0xFFFF, i ? 0 : d);
  for (; i < d; i += 16) pv_tile<RT, 1, T>(P, ldp, V + i, ldv, nk, d, O + i, tail_mask(d - i), i ? 0 : d);
}

template <class T>
static void pv(const float* P, int64_t ldp, int R, const T* V, int64_t ldv, int nk, int d, float* O) {
  for_row_blocks4(R, [&](auto rt, int r) {
    pv_rows<decltype(rt)::value, T>(P + r * ldp, ldp, V, ldv, nk, d, O + (int64_t)r * d);
  });
}

// 16 x 16 transpose in registers: v[t] lane u becomes v[u] lane t.
static inline void transpose16(__m512 (&v)[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)
    t[2 * k] = _mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), t[2 * k + 1] = _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // v[4k + c], 128-bit lane L: rows 4k..4k+3 of column 4L + c
    v[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    v[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    v[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    v[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x88), t[4 + c] = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x88), t[12 + c] = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xDD);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88), v[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
    v[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88), v[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xDD);
  }
}

// The vector traits of attention_lanes.inc: zmm, 16 lanes, __mmask16 live
// masks (masked loads and stores for the dim tails). Internal linkage: one
// Lanes per ISA translation unit.
namespace {
struct Lanes {
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }  // fused into the FMA as {1to16}
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V load_h(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V load_part(const float* p, int n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
  static void store_part(float* p, V v, int n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }
  static void cvt_tail(const uint16_t* x, float* y, int n) {
    const M k = tail_mask(n);
    _mm512_mask_storeu_ps(y, k, load16(x, k));
  }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V exp(V x) { return exp_neg(x); }
  static M live(V m) { return _mm512_cmp_ps_mask(m, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ); }
  static V or_zero(V m) { return _mm512_mask_blend_ps(live(m), _mm512_setzero_ps(), m); }  // -inf -> 0
  static V keep_below(V j, V lim, V x) {  // x where j < lim, else -inf
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(j, lim, _CMP_LT_OQ), _mm512_set1_ps(-INFINITY), x);
  }
  static V load_live(M k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
  static bool any_ne(V a, V b, M k) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ) & k; }
  // lanes outside `seen` keep *o (the first slot: 0)
  static void merge_slot(bool first, M seen, V w, const float* p, float* o) {
    const V pv = _mm512_loadu_ps(p), oo = _mm512_loadu_ps(o);
    _mm512_storeu_ps(o, first ? _mm512_maskz_mul_ps(seen, w, pv)
                              : _mm512_mask_blend_ps(seen, oo, _mm512_fmadd_ps(w, pv, oo)));
  }
  static void transpose(V (&v)[16]) { transpose16(v); }
};
}  // namespace

// The rows-in-lanes path of 5+ rows (seg_lanes, to_lanes, from_lanes, merge_lanes)
#include "model/attention_lanes.inc"

}  // namespace avx512

// Null entries are AVX2's (filled by the IsaTable in attention.cpp).
extern const AttnKernels kAttnAvx512Own = {nullptr,  // k_tile_f32, k_tile_f16, v_tile_f16, qk: the row-major
                                           nullptr,  // tiled path, which the lanes path below replaces
                                           nullptr,
                                           nullptr,
                                           &avx512::qk_direct<float>,  // decoding (R <= 4)
                                           &avx512::qk_direct<uint16_t>,
                                           &avx512::softmax_tile,
                                           &avx512::pv<float>,
                                           &avx512::pv<uint16_t>,
                                           nullptr,  // to_f16
                                           &avx512::seg_lanes<float>,
                                           &avx512::seg_lanes<uint16_t>,
                                           &avx512::to_lanes,
                                           &avx512::from_lanes,
                                           &avx512::merge_lanes};
}  // namespace bitdlm
