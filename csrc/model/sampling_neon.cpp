// The greedy select epilogue with NEON (aarch64 baseline, no flags: every ARM
// level; sampling.cpp calls it when the kernels' ISA is above scalar).
#include <arm_neon.h>

#include <cmath>

#include "model/sampling.h"
#include "model/simd_neon.h"

namespace bitdlm {

// The greedy row's pieces (sampling.h), as sampling_avx2.cpp: the max and the
// first index holding it are exact; the exp sum is accumulated in double from
// float exps (~1e-7 relative to the portable row's).
static float row_max(const float* l, int n) { return neon::row_max(l, n, -INFINITY); }

static int first_eq(const float* l, int n, float v) {
  const float32x4_t vv = vdupq_n_f32(v);
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    // one 16-bit lane per comparison result: the first set nibble is the first hit
    const uint64_t hit = vget_lane_u64(vreinterpret_u64_u16(vmovn_u32(vceqq_f32(vld1q_f32(l + i), vv))), 0);
    if (hit) return i + __builtin_ctzll(hit) / 16;
  }
  for (; i < n; ++i)
    if (l[i] == v) return i;
  return -1;
}

static double exp_sum(const float* l, int n, float mx) {
  const float32x4_t vmx = vdupq_n_f32(mx);
  float64x2_t s0 = vdupq_n_f64(0.0), s1 = s0;
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t e = neon::exp_neg(vsubq_f32(vld1q_f32(l + i), vmx));
    s0 = vaddq_f64(s0, vcvt_f64_f32(vget_low_f32(e)));
    s1 = vaddq_f64(s1, vcvt_high_f64_f32(e));
  }
  double sum = vaddvq_f64(vaddq_f64(s0, s1));
  for (; i < n; ++i) sum += std::exp(l[i] - mx);
  return sum;
}

extern const SelectKernels kSelectNeon = {&row_max, &first_eq, &exp_sum};

}  // namespace bitdlm
