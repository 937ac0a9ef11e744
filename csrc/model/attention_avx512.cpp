// Attention hot loops with AVX-512 F/BW/VL (compiled with those flags only):
// the tiled path of 8-32 queries (scores, online softmax, values) 16 lanes
// wide, with masked tails instead of scalar loops. The K/V tile conversions
// (8x8 transposes) and the direct decode kernels stay AVX2's: attention.cpp
// fills every entry this table leaves null from kAttnAvx2.
//
// Scores tiles cover a whole key tile: 4 query rows x 64 keys = 16 zmm
// accumulators, per dim 4 key loads + 4 broadcasts for 16 FMAs (AVX2: 4 + 4
// for 8 FMAs of half the width). Values: 4 rows x 64 dims per pass.
// GCC 12 warns "__Y is used uninitialized" inside its own AVX-512 intrinsics
// (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels/simd512.h"  // intrinsics, or SIMDe in tests/simde/attention_harness.cpp

#include <cmath>

#include "model/attention.h"
#include "model/row_blocks.h"

namespace bitdlm {
namespace avx512 {

static inline int round8(int n) { return (n + 7) & ~7; }
static inline __mmask16 tail_mask(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// exp for x <= 0: the same range reduction and polynomial as avx2::exp_neg
// (simd_avx2.h), lane for lane.
static inline __m512 exp_neg(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-60.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
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
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps((__mmask16)~tiny, y, _mm512_castsi512_ps(e));
}

// S[r][0..16*NV) = scale * Q[r] . KT[:, cols] for RT rows; the last vector masked by `last`.
template <int RT, int NV>
static inline void qk_tile(const float* Q, int d, const float* KT, int ldkt, float scale, float* S, int64_t lds,
                           __mmask16 last) {
  __m512 acc[RT][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int i = 0; i < d; ++i) {
    __m512 kv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) kv[c] = load16(KT + (int64_t)i * ldkt + 16 * c, c == NV - 1 ? last : 0xFFFF);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const __m512 qb = _mm512_set1_ps(Q[(int64_t)r * d + i]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c)
      _mm512_mask_storeu_ps(S + r * lds + 16 * c, c == NV - 1 ? last : 0xFFFF, _mm512_mul_ps(acc[r][c], sc));
}

template <int RT>
static inline void qk_rows(const float* Q, const float* KT, int ldkt, int nk8, int d, float scale, float* S,
                           int64_t lds) {
  const int nv = (nk8 + 15) / 16;
  const __mmask16 last = tail_mask(nk8 - 16 * (nv - 1));
  switch (nv) {
    case 4: qk_tile<RT, 4>(Q, d, KT, ldkt, scale, S, lds, last); break;
    case 3: qk_tile<RT, 3>(Q, d, KT, ldkt, scale, S, lds, last); break;
    case 2: qk_tile<RT, 2>(Q, d, KT, ldkt, scale, S, lds, last); break;
    case 1: qk_tile<RT, 1>(Q, d, KT, ldkt, scale, S, lds, last); break;
    default: break;
  }
}

// KT columns up to round8(nk) are valid (k_tile zeroes the padding); S gets those columns.
static void qk(const float* Q, int R, const float* KT, int ldkt, int nk, int d, float scale, float* S, int64_t lds) {
  static_assert(kAttnTile <= 64, "qk_tile covers at most 4 vectors of 16 keys");
  const int nk8 = round8(nk);
  for_row_blocks4(R, [&](auto rt, int r) {
    qk_rows<decltype(rt)::value>(Q + (int64_t)r * d, KT, ldkt, nk8, d, scale, S + r * lds, lds);
  });
}

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

// O[r][0..16*NV) += sum_j P[r][j] V[j][..] for RT rows; the last vector masked by `last`.
template <int RT, int NV, class T>
static inline void pv_tile(const float* P, int64_t ldp, const T* V, int64_t ldv, int nk, int d, float* O,
                           __mmask16 last) {
  __m512 acc[RT][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_maskz_loadu_ps(c == NV - 1 ? last : 0xFFFF, O + (int64_t)r * d + 16 * c);
  for (int j = 0; j < nk; ++j) {
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
  int i = 0;
  for (; i + 64 <= d; i += 64) pv_tile<RT, 4, T>(P, ldp, V + i, ldv, nk, d, O + i, 0xFFFF);
  for (; i < d; i += 16) pv_tile<RT, 1, T>(P, ldp, V + i, ldv, nk, d, O + i, tail_mask(d - i));
}

template <class T>
static void pv(const float* P, int64_t ldp, int R, const T* V, int64_t ldv, int nk, int d, float* O) {
  for_row_blocks4(R, [&](auto rt, int r) {
    pv_rows<decltype(rt)::value, T>(P + r * ldp, ldp, V, ldv, nk, d, O + (int64_t)r * d);
  });
}

}  // namespace avx512

// Null entries are AVX2's (filled by the IsaTable in attention.cpp).
extern const AttnKernels kAttnAvx512Own = {nullptr,  // k_tile_f32: AVX2 8x8 transposes
                                           nullptr,  // k_tile_f16
                                           nullptr,  // v_tile_f16
                                           &avx512::qk,
                                           nullptr,  // qk_direct_f32 (decode)
                                           nullptr,  // qk_direct_f16
                                           &avx512::softmax_tile,
                                           &avx512::pv<float>,
                                           &avx512::pv<uint16_t>,
                                           nullptr};  // to_f16
}  // namespace bitdlm
