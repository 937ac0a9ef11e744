// NEON helpers shared by the model's aarch64 translation units (*_neon.cpp,
// built without -march flags: Advanced SIMD, FRINTM and FMA are ARMv8-A): a
// vector exp and a row max. Static, like simd_avx2.h.
#pragma once
#include <arm_neon.h>

namespace bitdlm {
namespace neon {

// exp for x <= 0 (softmax after subtracting the max): avx2::exp_neg's range
// reduction x = n ln2 + f, degree-5 polynomial on f and 2^n through the
// exponent bits, step for step (FMA where it has FMA), so every vector exp
// of the project is one algorithm; ~1e-7 relative error; 0 below -60.
static inline float32x4_t exp_neg(float32x4_t x) {
  const uint32x4_t tiny = vcltq_f32(x, vdupq_n_f32(-60.0f));
  x = vmaxq_f32(x, vdupq_n_f32(-88.0f));
  const float32x4_t fx = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), x, vdupq_n_f32(1.44269504088896341f)));
  x = vfmsq_f32(x, fx, vdupq_n_f32(0.693359375f));
  x = vfmsq_f32(x, fx, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
  y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, x);
  y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, x);
  y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, x);
  y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, x);
  y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, x);
  y = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.0f)), y, vmulq_f32(x, x));
  // 2^n, n >= -127: n = -127 gives the bit pattern 0, i.e. +0
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127)), 23);
  const float32x4_t r = vmulq_f32(y, vreinterpretq_f32_s32(e));
  return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(r), tiny));
}

// max(init, s[0..n)); FMAX propagates a NaN (then no element equals the max)
static inline float row_max(const float* s, int n, float init) {
  float32x4_t vm = vdupq_n_f32(init);
  int j = 0;
  for (; j + 4 <= n; j += 4) vm = vmaxq_f32(vm, vld1q_f32(s + j));
  float mx = vmaxvq_f32(vm);
  for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

}  // namespace neon
}  // namespace bitdlm
