// Attention hot loops with AVX2 + FMA + F16C (compiled with those flags only).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "model/attention.h"
#include "model/row_blocks.h"
#include "kernels/isa.h"
#include "model/half.h"
#include "model/prefetch.h"
#include "model/simd_avx2.h"

namespace bitdlm {
namespace avx2 {

static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) { return half_to_float(*p); }

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline __m128 hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Scores straight from K rows (no transposed tile) for R <= 4 rows, i.e. one
// query's heads when decoding: each key row is loaded (and converted) once for
// the R rows; R = 4 runs 2 keys x 4 rows = 8 named accumulators (enough
// independent FMA chains), other R one dot product at a time.

template <class T>
static void qk_direct(const float* Q, int R, const T* K, int64_t ld, int nk, int d, float scale, float* S,
                      int64_t lds) {
  int j = 0;
  if (R == 4 && d % 8 == 0) {
    const float *q0 = Q, *q1 = Q + d, *q2 = Q + 2 * d, *q3 = Q + 3 * d;
    const __m128 sc = _mm_set1_ps(scale);
    for (; j + 2 <= nk; j += 2) {
      prefetch_rows(K + (j + kAttnPrefetchRows) * ld, ld, 2, d);
      const T *k0 = K + j * ld, *k1 = k0 + ld;
      __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
      for (int i = 0; i < d; i += 8) {
        const __m256 x0 = load8(k0 + i), x1 = load8(k1 + i);
        __m256 q = _mm256_loadu_ps(q0 + i);
        a00 = _mm256_fmadd_ps(q, x0, a00), a01 = _mm256_fmadd_ps(q, x1, a01);
        q = _mm256_loadu_ps(q1 + i);
        a10 = _mm256_fmadd_ps(q, x0, a10), a11 = _mm256_fmadd_ps(q, x1, a11);
        q = _mm256_loadu_ps(q2 + i);
        a20 = _mm256_fmadd_ps(q, x0, a20), a21 = _mm256_fmadd_ps(q, x1, a21);
        q = _mm256_loadu_ps(q3 + i);
        a30 = _mm256_fmadd_ps(q, x0, a30), a31 = _mm256_fmadd_ps(q, x1, a31);
      }
      float s0[4], s1[4];
      _mm_storeu_ps(s0, _mm_mul_ps(hsum4(a00, a10, a20, a30), sc));
      _mm_storeu_ps(s1, _mm_mul_ps(hsum4(a01, a11, a21, a31), sc));
      for (int r = 0; r < 4; ++r) S[r * lds + j] = s0[r], S[r * lds + j + 1] = s1[r];
    }
  }
  const int d8 = d & ~7;
  for (; j < nk; ++j) {
    prefetch_rows(K + (j + kAttnPrefetchRows) * ld, ld, 1, d);
    for (int r = 0; r < R; ++r) {
      const float* q = Q + (int64_t)r * d;
      const T* k = K + j * ld;
      __m256 a = _mm256_setzero_ps();
      for (int i = 0; i < d8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a);
      float x = hsum(a);
      for (int i = d8; i < d; ++i) x += q[i] * load1(k + i);
      S[r * lds + j] = x * scale;
    }
  }
}


// 8 x 8 transpose in registers: r[t] lane u becomes r[u] lane t.
static inline void transpose8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// s[j] = exp(s[j] - mx) for j < n; returns their sum.
static inline float exp_sum(float* s, int n, float mx) {
  const int n8 = n & ~7;
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vs = _mm256_setzero_ps();
  for (int j = 0; j < n8; j += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx));
    _mm256_storeu_ps(s + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  float sum = hsum(vs);
  for (int j = n8; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  return sum;
}

static inline void scale_row(float* x, int n, float a) {
  const __m256 va = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), va));
  for (; i < n; ++i) x[i] *= a;
}

#include "model/softmax_tile.inc"

// Values tile: RT rows x 8*NV output dims, accumulated over nk keys.
template <int RT, int NV, class T>
static inline void pv_tile(const float* P, int64_t ldp, const T* V, int64_t ldv, int nk, int d, float* O, int pf) {
  __m256 acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm256_loadu_ps(O + (int64_t)r * d + 8 * c);
  for (int j = 0; j < nk; ++j) {
    if (pf) prefetch_rows(V + (j + kAttnPrefetchRows) * ldv, ldv, 1, pf);
    __m256 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load8(V + j * ldv + 8 * c);
    for (int r = 0; r < RT; ++r) {
      const __m256 pb = _mm256_broadcast_ss(P + r * ldp + j);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm256_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(O + (int64_t)r * d + 8 * c, acc[r][c]);
}

// The main tile with named accumulators: GCC register-allocates these, while
// for the array form above it keeps a stack copy updated with one store per
// FMA (measured ~1 FMA per cycle instead of ~2); the array form only runs tails.
#define BITDLM_FMA4x2(b0, b1, b2, b3, x0, x1)                                          \
  a00 = _mm256_fmadd_ps(b0, x0, a00), a01 = _mm256_fmadd_ps(b0, x1, a01);             \
  a10 = _mm256_fmadd_ps(b1, x0, a10), a11 = _mm256_fmadd_ps(b1, x1, a11);             \
  a20 = _mm256_fmadd_ps(b2, x0, a20), a21 = _mm256_fmadd_ps(b2, x1, a21);             \
  a30 = _mm256_fmadd_ps(b3, x0, a30), a31 = _mm256_fmadd_ps(b3, x1, a31)

template <class T>
static inline void pv_4x16(const float* P, int64_t ldp, const T* V, int64_t ldv, int nk, int d, float* O, int pf) {
  float *o0 = O, *o1 = O + d, *o2 = O + 2 * d, *o3 = O + 3 * d;
  __m256 a00 = _mm256_loadu_ps(o0), a01 = _mm256_loadu_ps(o0 + 8), a10 = _mm256_loadu_ps(o1),
         a11 = _mm256_loadu_ps(o1 + 8), a20 = _mm256_loadu_ps(o2), a21 = _mm256_loadu_ps(o2 + 8),
         a30 = _mm256_loadu_ps(o3), a31 = _mm256_loadu_ps(o3 + 8);
  const float *p0 = P, *p1 = P + ldp, *p2 = P + 2 * ldp, *p3 = P + 3 * ldp;
  for (int j = 0; j < nk; ++j) {
    if (pf) prefetch_rows(V + (j + kAttnPrefetchRows) * ldv, ldv, 1, pf);
    const __m256 v0 = load8(V + j * ldv), v1 = load8(V + j * ldv + 8);
    BITDLM_FMA4x2(_mm256_broadcast_ss(p0 + j), _mm256_broadcast_ss(p1 + j), _mm256_broadcast_ss(p2 + j),
                  _mm256_broadcast_ss(p3 + j), v0, v1);
  }
  _mm256_storeu_ps(o0, a00), _mm256_storeu_ps(o0 + 8, a01), _mm256_storeu_ps(o1, a10), _mm256_storeu_ps(o1 + 8, a11);
  _mm256_storeu_ps(o2, a20), _mm256_storeu_ps(o2 + 8, a21), _mm256_storeu_ps(o3, a30), _mm256_storeu_ps(o3 + 8, a31);
}
#undef BITDLM_FMA4x2

template <int RT, class T>
static inline void pv_rows(const float* P, int64_t ldp, const T* V, int64_t ldv, int nk, int d, float* O) {
  int i = 0;  // the first pass over the keys prefetches whole V rows ahead
  for (; i + 16 <= d; i += 16)
    if constexpr (RT == 4)
      pv_4x16(P, ldp, V + i, ldv, nk, d, O + i, i ? 0 : d);
    else
      pv_tile<RT, 2, T>(P, ldp, V + i, ldv, nk, d, O + i, i ? 0 : d);
  for (; i + 8 <= d; i += 8) pv_tile<RT, 1, T>(P, ldp, V + i, ldv, nk, d, O + i, i ? 0 : d);
  for (; i < d; ++i)
    for (int r = 0; r < RT; ++r) {
      float acc = O[(int64_t)r * d + i];
      for (int j = 0; j < nk; ++j) acc += P[r * ldp + j] * load1(V + j * ldv + i);
      O[(int64_t)r * d + i] = acc;
    }
}

// T = uint16_t: fp16 values converted as they are loaded (for few rows, where
// converting a tile first would cost as much as the products).
template <class T>
static void pv(const float* P, int64_t ldp, int R, const T* V, int64_t ldv, int nk, int d, float* O) {
  for_row_blocks4(R, [&](auto rt, int r) {
    pv_rows<decltype(rt)::value, T>(P + r * ldp, ldp, V, ldv, nk, d, O + (int64_t)r * d);
  });
}

static void to_f16(const float* x, uint16_t* y, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) y[i] = f32_to_f16(x[i]);
}

// The vector traits of attention_lanes.inc: ymm, 8 lanes; AVX2 has no mask
// registers, so live masks are all-ones / zero lanes (cmpps) applied by AND,
// dim tails go through vmaskmovps and fp16 tails through scalar conversion;
// no broadcast operands either: one vbroadcastss per K / V element for NV
// FMAs (chunks of 32 rows = 4 ymm x 2 keys / dims = 8 accumulators, of 16
// registers). Internal linkage: one Lanes per ISA translation unit.
namespace {
struct Lanes {
  using V = __m256;
  using M = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V load_h(const uint16_t* p) { return load8(p); }
  static __m256i part_mask(int n) {  // lanes < n all ones
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_part(const float* p, int n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, part_mask(n));
  }
  static void store_part(float* p, V v, int n) {
    if (n >= 8)
      _mm256_storeu_ps(p, v);
    else
      _mm256_maskstore_ps(p, part_mask(n), v);
  }
  static void cvt_tail(const uint16_t* x, float* y, int n) {
    for (int i = 0; i < n; ++i) y[i] = half_to_float(x[i]);
  }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V exp(V x) { return exp_neg(x); }
  static M live(V m) { return _mm256_cmp_ps(m, _mm256_set1_ps(-INFINITY), _CMP_NEQ_UQ); }
  static V or_zero(V m) { return _mm256_and_ps(live(m), m); }  // -inf -> 0
  static V keep_below(V j, V lim, V x) {  // x where j < lim, else -inf
    return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, _mm256_cmp_ps(j, lim, _CMP_LT_OQ));
  }
  static V load_live(M k, const float* p) { return _mm256_and_ps(k, _mm256_loadu_ps(p)); }
  static bool any_ne(V a, V b, M k) { return _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(a, b, _CMP_NEQ_UQ), k)); }
  // p read as 0 outside `seen` (w is 0 there too)
  static void merge_slot(bool first, M seen, V w, const float* p, float* o) {
    const V pv = _mm256_and_ps(seen, _mm256_loadu_ps(p));
    _mm256_storeu_ps(o, first ? _mm256_mul_ps(w, pv) : _mm256_fmadd_ps(w, pv, _mm256_loadu_ps(o)));
  }
  static void transpose(V (&v)[8]) { transpose8(v); }
};
}  // namespace

// The rows-in-lanes path of 5+ rows (seg_lanes, to_lanes, from_lanes,
// merge_lanes), as attention_avx512.cpp's with 8-lane vectors
#include "model/attention_lanes.inc"

}  // namespace avx2

// The row-major tiled path's k_tile / v_tile / qk are not here: jobs of 5+
// rows take the lanes path below (attention.cpp never calls those three for a
// table that has it), and the IsaTable fills the null entries from portable.
extern const AttnKernels kAttnAvx2 = {nullptr,  // k_tile_f32
                                      nullptr,  // k_tile_f16
                                      nullptr,  // v_tile_f16
                                      nullptr,  // qk
                                      &avx2::qk_direct<float>,
                                      &avx2::qk_direct<uint16_t>,
                                      &avx2::softmax_tile,
                                      &avx2::pv<float>,
                                      &avx2::pv<uint16_t>,
                                      &avx2::to_f16,
                                      &avx2::seg_lanes<float>,
                                      &avx2::seg_lanes<uint16_t>,
                                      &avx2::to_lanes,
                                      &avx2::from_lanes,
                                      &avx2::merge_lanes};

}  // namespace bitdlm
