// The greedy select epilogue with AVX2 (compiled with AVX2 + FMA flags only;
// sampling.cpp calls it when the kernels' ISA is above scalar).
#include <immintrin.h>

#include <cmath>

#include "model/sampling.h"
#include "model/simd_avx2.h"

namespace bitdlm {

// argmax (first index on ties) and its softmax probability, like the portable
// greedy: the max and its index are exact; the exp sum is accumulated in
// double from float exps (~1e-7 relative). false if no lane equals the max
// (NaN logits): the caller then runs the portable code.
static bool greedy(const float* l, int V, int32_t* tok, float* conf) {
  const float mx = avx2::row_max(l, V, -INFINITY);
  const __m256 vmx = _mm256_set1_ps(mx);
  int best = -1;
  int i = 0;
  for (; i + 8 <= V; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(l + i), vmx, _CMP_EQ_OQ));
    if (hit) {
      best = i + __builtin_ctz(hit);
      break;
    }
  }
  for (; best < 0 && i < V; ++i)
    if (l[i] == mx) best = i;
  if (best < 0) return false;
  __m256d s0 = _mm256_setzero_pd(), s1 = s0;
  for (i = 0; i + 8 <= V; i += 8) {
    const __m256 e = avx2::exp_neg(_mm256_sub_ps(_mm256_loadu_ps(l + i), vmx));
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double d4[4];
  _mm256_storeu_pd(d4, _mm256_add_pd(s0, s1));
  double sum = (d4[0] + d4[1]) + (d4[2] + d4[3]);
  for (; i < V; ++i) sum += std::exp(l[i] - mx);
  *tok = best;
  *conf = (float)(1.0 / sum);
  return true;
}

extern const SelectKernels kSelectAvx2 = {&greedy};

}  // namespace bitdlm
