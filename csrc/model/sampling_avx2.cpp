// The greedy select epilogue with AVX2 (compiled with AVX2 + FMA flags only;
// sampling.cpp calls it when the kernels' ISA is above scalar).
#include <immintrin.h>

#include <cmath>

#include "model/sampling.h"
#include "model/simd_avx2.h"

namespace bitdlm {

// The greedy row's pieces (sampling.h): the max and the first index holding it
// are exact; the exp sum is accumulated in double from float exps (~1e-7
// relative to the portable row's).
static float row_max(const float* l, int n) { return avx2::row_max(l, n, -INFINITY); }

static int first_eq(const float* l, int n, float v) {
  const __m256 vv = _mm256_set1_ps(v);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(l + i), vv, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < n; ++i)
    if (l[i] == v) return i;
  return -1;
}

static double exp_sum(const float* l, int n, float mx) {
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256d s0 = _mm256_setzero_pd(), s1 = s0;
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = avx2::exp_neg(_mm256_sub_ps(_mm256_loadu_ps(l + i), vmx));
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double d4[4];
  _mm256_storeu_pd(d4, _mm256_add_pd(s0, s1));
  double sum = (d4[0] + d4[1]) + (d4[2] + d4[3]);
  for (; i < n; ++i) sum += std::exp(l[i] - mx);
  return sum;
}

extern const SelectKernels kSelectAvx2 = {&row_max, &first_eq, &exp_sum};

}  // namespace bitdlm
