// For tests/simde/attention_harness.cpp only: attention_avx512.cpp compiled
// against SIMDe (-DBITDLM_SIMDE, no AVX-512 flags) through SIMDe's native
// aliases, plus the few intrinsics SIMDe 0.7.4 lacks (lane loops: slow, exact).
#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/svml.h>  // _mm512_floor_ps

#include <cstdint>
#include <cstring>

#include "kernels/isa.h"

typedef simde__mmask16 __mmask16;
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#define _MM_FROUND_TO_NEG_INF SIMDE_MM_FROUND_TO_NEG_INF
#endif

static inline __m512 shim_from(const float* v) {
  __m512 r;
  std::memcpy(&r, v, 64);
  return r;
}
static inline __m512 _mm512_maskz_loadu_ps(__mmask16 k, const void* p) {
  float v[16];
  for (int i = 0; i < 16; ++i) v[i] = (k >> i) & 1 ? static_cast<const float*>(p)[i] : 0.f;
  return shim_from(v);
}
static inline void _mm512_mask_storeu_ps(void* p, __mmask16 k, __m512 a) {
  float v[16];
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) static_cast<float*>(p)[i] = v[i];
}
// fp16 lanes loaded under a mask and converted: returned as the converted floats
// packed in a struct the shim's _mm512_cvtph_ps unwraps.
struct shim_ph16 {
  uint16_t h[16];
};
static inline shim_ph16 _mm256_maskz_loadu_epi16(__mmask16 k, const void* p) {
  shim_ph16 r;
  for (int i = 0; i < 16; ++i) r.h[i] = (k >> i) & 1 ? static_cast<const uint16_t*>(p)[i] : 0;
  return r;
}
static inline __m512 _mm512_cvtph_ps(shim_ph16 a) {
  float v[16];
  for (int i = 0; i < 16; ++i) v[i] = bitdlm::half_to_float(a.h[i]);
  return shim_from(v);
}
static inline float _mm512_reduce_max_ps(__m512 a) {
  float v[16];
  std::memcpy(v, &a, 64);
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
static inline float _mm512_reduce_add_ps(__m512 a) {  // GCC's tree: halves, then quarters, ...
  float v[16];
  std::memcpy(v, &a, 64);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) v[i] = v[i] + v[i + w];
  return v[0];
}
static inline __m512i _mm512_cvttps_epi32(__m512 a) {
  float v[16];
  int32_t o[16];
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 16; ++i) o[i] = (int32_t)v[i];
  __m512i r;
  std::memcpy(&r, o, 64);
  return r;
}
