// AVX2 helpers shared by the model's AVX2 translation units only
// (*_avx2.cpp): a vector exp and row reductions. Static, so no code built with
// AVX flags is ever shared with baseline files.
#pragma once
#include <immintrin.h>

namespace bitdlm {
namespace avx2 {

// exp for x <= 0 (softmax after subtracting the max): Cephes-style range
// reduction x = n ln2 + f, degree-5 polynomial on f, 2^n through the exponent
// bits; ~1e-7 relative error; 0 below -87.3 (2^n underflows to 0 there).
static inline __m256 exp_neg(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-60.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.0f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  // 2^n, n >= -127: n = -127 gives the bit pattern 0, i.e. +0
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

static inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// max(init, s[0..n))
static inline float row_max(const float* s, int n, float init) {
  const int n8 = n & ~7;
  __m256 vm = _mm256_set1_ps(init);
  for (int j = 0; j < n8; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + j));
  float mx = hmax(vm);
  for (int j = n8; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

}  // namespace avx2
}  // namespace bitdlm
