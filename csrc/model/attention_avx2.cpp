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

template <class T>
static void scores(const float* q, const T* K, int64_t ld, int nk, int d, float scale, float* out) {
  const int d8 = d & ~7;
  for (int j = 0; j < nk; ++j) {
    const T* kr = K + j * ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= d8; i += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(kr + i), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(kr + i + 8), a1);
    }
    for (; i < d8; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(kr + i), a0);
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; i < d; ++i) acc += q[i] * load1(kr + i);
    out[j] = acc * scale;
  }
}

template <class T>
static void accum(const float* p, const T* V, int64_t ld, int nk, int d, float* out) {
  const int d8 = d & ~7;
  // Register-blocked over d when it fits (head_dim <= 128): out stays in registers.
  if (d8 == d && d <= 128) {
    __m256 acc[16];
    const int nv = d / 8;
    for (int r = 0; r < nv; ++r) acc[r] = _mm256_loadu_ps(out + 8 * r);
    for (int j = 0; j < nk; ++j) {
      const __m256 w = _mm256_set1_ps(p[j]);
      const T* vr = V + j * ld;
      for (int r = 0; r < nv; ++r) acc[r] = _mm256_fmadd_ps(w, load8(vr + 8 * r), acc[r]);
    }
    for (int r = 0; r < nv; ++r) _mm256_storeu_ps(out + 8 * r, acc[r]);
    return;
  }
  for (int j = 0; j < nk; ++j) {
    const __m256 w = _mm256_set1_ps(p[j]);
    const T* vr = V + j * ld;
    int i = 0;
    for (; i < d8; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(w, load8(vr + i), _mm256_loadu_ps(out + i)));
    for (; i < d; ++i) out[i] += p[j] * load1(vr + i);
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
