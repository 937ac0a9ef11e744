// The greedy select epilogue with NEON (aarch64 baseline, no flags: every ARM
// level; sampling.cpp calls it when the kernels' ISA is above scalar).
#include <arm_neon.h>

#include <cmath>

#include "model/sampling.h"
#include "model/simd_neon.h"

namespace bitdlm {

// argmax (first index on ties) and its softmax probability, as sampling_avx2.cpp:
// the max and its index are exact; the exp sum is accumulated in double from
// float exps (~1e-7 relative). false if no element equals the max (NaN logits):
// the caller then runs the portable code.
static bool greedy(const float* l, int V, int32_t* tok, float* conf) {
  const float mx = neon::row_max(l, V, -INFINITY);
  const float32x4_t vmx = vdupq_n_f32(mx);
  int best = -1;
  int i = 0;
  for (; i + 4 <= V; i += 4) {
    // one 16-bit lane per comparison result: the first set nibble is the first hit
    const uint64_t hit = vget_lane_u64(vreinterpret_u64_u16(vmovn_u32(vceqq_f32(vld1q_f32(l + i), vmx))), 0);
    if (hit) {
      best = i + __builtin_ctzll(hit) / 16;
      break;
    }
  }
  for (; best < 0 && i < V; ++i)
    if (l[i] == mx) best = i;
  if (best < 0) return false;
  float64x2_t s0 = vdupq_n_f64(0.0), s1 = s0;
  for (i = 0; i + 4 <= V; i += 4) {
    const float32x4_t e = neon::exp_neg(vsubq_f32(vld1q_f32(l + i), vmx));
    s0 = vaddq_f64(s0, vcvt_f64_f32(vget_low_f32(e)));
    s1 = vaddq_f64(s1, vcvt_high_f64_f32(e));
  }
  double sum = vaddvq_f64(vaddq_f64(s0, s1));
  for (; i < V; ++i) sum += std::exp(l[i] - mx);
  *tok = best;
  *conf = (float)(1.0 / sum);
  return true;
}

extern const SelectKernels kSelectNeon = {&greedy};

}  // namespace bitdlm
