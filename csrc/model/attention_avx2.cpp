// Attention hot loops with AVX2 + FMA + F16C (compiled with those flags only).
#include <immintrin.h>

#include "model/attention.h"
#include "model/half.h"

namespace bitdlm {
namespace avx2 {

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) { return f16_to_f32(*p); }

// Up to 4 query heads per pass: one key row load (+ fp16 conversion) feeds NQ FMAs.
template <int NQ, class T>
static void scores_n(const float* q, int64_t ldq, const T* K, int64_t ld, int nk, int d, float scale, float* out,
                     int64_t ldo) {
  const int d8 = d & ~7;
  for (int j = 0; j < nk; ++j) {
    const T* kr = K + j * ld;
    __m256 acc[NQ];
    for (int h = 0; h < NQ; ++h) acc[h] = _mm256_setzero_ps();
    int i = 0;
    for (; i < d8; i += 8) {
      const __m256 kv = load8(kr + i);
      for (int h = 0; h < NQ; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * ldq + i), kv, acc[h]);
    }
    for (int h = 0; h < NQ; ++h) {
      float r = hsum(acc[h]);
      for (int t = i; t < d; ++t) r += q[h * ldq + t] * load1(kr + t);
      out[h * ldo + j] = r * scale;
    }
  }
}

template <class T>
static void scores(const float* q, int64_t ldq, int nq, const T* K, int64_t ld, int nk, int d, float scale,
                   float* out, int64_t ldo) {
  for (int h = 0; h < nq; h += 4) {
    const float* qh = q + h * ldq;
    float* oh = out + h * ldo;
    switch (nq - h) {
      case 1: scores_n<1>(qh, ldq, K, ld, nk, d, scale, oh, ldo); break;
      case 2: scores_n<2>(qh, ldq, K, ld, nk, d, scale, oh, ldo); break;
      case 3: scores_n<3>(qh, ldq, K, ld, nk, d, scale, oh, ldo); break;
      default: scores_n<4>(qh, ldq, K, ld, nk, d, scale, oh, ldo); break;
    }
  }
}

// out_h[i0:i0+8*NV] += sum_j p_h[j] V[j][i0:...] for NQ heads: NQ*NV accumulators in registers.
template <int NQ, int NV, class T>
static void accum_tile(const float* p, int64_t ldp, const T* V, int64_t ld, int nk, int i0, float* out,
                       int64_t ldout) {
  __m256 acc[NQ][NV];
  for (int h = 0; h < NQ; ++h)
    for (int r = 0; r < NV; ++r) acc[h][r] = _mm256_loadu_ps(out + h * ldout + i0 + 8 * r);
  for (int j = 0; j < nk; ++j) {
    const T* vr = V + j * ld + i0;
    __m256 vv[NV];
    for (int r = 0; r < NV; ++r) vv[r] = load8(vr + 8 * r);
    for (int h = 0; h < NQ; ++h) {
      const __m256 w = _mm256_broadcast_ss(p + h * ldp + j);
      for (int r = 0; r < NV; ++r) acc[h][r] = _mm256_fmadd_ps(w, vv[r], acc[h][r]);
    }
  }
  for (int h = 0; h < NQ; ++h)
    for (int r = 0; r < NV; ++r) _mm256_storeu_ps(out + h * ldout + i0 + 8 * r, acc[h][r]);
}

template <int NQ, class T>
static void accum_n(const float* p, int64_t ldp, const T* V, int64_t ld, int nk, int d, float* out, int64_t ldout) {
  int i = 0;
  for (; i + 32 <= d; i += 32) accum_tile<NQ, 4>(p, ldp, V, ld, nk, i, out, ldout);
  for (; i + 8 <= d; i += 8) accum_tile<NQ, 1>(p, ldp, V, ld, nk, i, out, ldout);
  for (; i < d; ++i)
    for (int j = 0; j < nk; ++j) {
      const float x = load1(V + j * ld + i);
      for (int h = 0; h < NQ; ++h) out[h * ldout + i] += p[h * ldp + j] * x;
    }
}

template <class T>
static void accum(const float* p, int64_t ldp, int nq, const T* V, int64_t ld, int nk, int d, float* out,
                  int64_t ldout) {
  for (int h = 0; h < nq; h += 4) {
    const float* ph = p + h * ldp;
    float* oh = out + h * ldout;
    switch (nq - h) {
      case 1: accum_n<1>(ph, ldp, V, ld, nk, d, oh, ldout); break;
      case 2: accum_n<2>(ph, ldp, V, ld, nk, d, oh, ldout); break;
      case 3: accum_n<3>(ph, ldp, V, ld, nk, d, oh, ldout); break;
      default: accum_n<4>(ph, ldp, V, ld, nk, d, oh, ldout); break;
    }
  }
}

static void to_f16(const float* x, uint16_t* y, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) y[i] = f32_to_f16(x[i]);
}

}  // namespace avx2

extern const AttnKernels kAttnAvx2 = {"avx2", &avx2::scores<float>, &avx2::scores<uint16_t>, &avx2::accum<float>,
                                      &avx2::accum<uint16_t>, &avx2::to_f16};

}  // namespace bitdlm
