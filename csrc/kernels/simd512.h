// AVX-512 shim: the same kernel source (gemm_avx512.inc) compiles against the
// real intrinsics (the module, with -mavx512* flags) or against SIMDe
// (tests/simde harness, -DBITDLM_SIMDE, no AVX-512 flags), so its logic is
// tested bit-exactly on machines without AVX-512.
//
// Kernel code writes every intrinsic as _mm512_xxx(...). SIMDe 0.7.4 lacks
// masked loads, _mm512_cvtph_ps and the reduce_add helpers, so those are
// helpers here. Everything is static: each ISA translation unit keeps its own
// copy (no inline symbol shared between files built with different flags).
// AVX-512 shim, the one for every AVX-512 source (gemm_avx512.inc,
// gemm_amx.cpp, model/attention_avx512.cpp): kernel code writes the plain
// intrinsic names. The module build (-mavx512* flags) gets <immintrin.h>; the
// SIMDe test build (-DBITDLM_SIMDE, no AVX-512 flags: tests/simde) gets SIMDe's
// native aliases of the same names plus, below, the few intrinsics SIMDe 0.7.4
// lacks (lane loops: slow, exact), so the same text is tested bit-exactly on
// machines without AVX-512. Everything is static or in an anonymous namespace:
// each ISA translation unit keeps its own copy (no inline symbol shared
// between files built with different flags).
#pragma once
#include <cstdint>
#include <cstring>

#ifdef BITDLM_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx2.h>
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/svml.h>  // _mm512_floor_ps

#include "kernels/isa.h"  // half_to_float
#else
#include <immintrin.h>
#endif

#ifdef BITDLM_SIMDE
// SIMDe 0.7.4's alias of _mm512_madd_epi16 takes the masked form's 4 arguments
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
typedef simde__mmask16 __mmask16;
typedef simde__mmask64 __mmask64;
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#define _MM_FROUND_TO_NEG_INF SIMDE_MM_FROUND_TO_NEG_INF
#endif
template <class V, class T>
static inline V shim_from(const T* v) {
  V r;
  std::memcpy(&r, v, sizeof r);
  return r;
}
static inline __m512i _mm512_maskz_loadu_epi8(__mmask64 k, const void* p) {
  int8_t v[64];
  for (int i = 0; i < 64; ++i) v[i] = (k >> i) & 1 ? static_cast<const int8_t*>(p)[i] : 0;
  return shim_from<__m512i>(v);
}
static inline __m512 _mm512_maskz_loadu_ps(__mmask16 k, const void* p) {
  float v[16];
  for (int i = 0; i < 16; ++i) v[i] = (k >> i) & 1 ? static_cast<const float*>(p)[i] : 0.f;
  return shim_from<__m512>(v);
}
static inline void _mm512_mask_storeu_ps(void* p, __mmask16 k, __m512 a) {
  float v[16];
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) static_cast<float*>(p)[i] = v[i];
}
static inline __m256i _mm256_maskz_loadu_epi16(__mmask16 k, const void* p) {
  uint16_t h[16];
  for (int i = 0; i < 16; ++i) h[i] = (k >> i) & 1 ? static_cast<const uint16_t*>(p)[i] : 0;
  return shim_from<__m256i>(h);
}
static inline __m512 _mm512_cvtph_ps(__m256i a) {
  uint16_t h[16];
  float v[16];
  std::memcpy(h, &a, 32);
  for (int i = 0; i < 16; ++i) v[i] = bitdlm::half_to_float(h[i]);
  return shim_from<__m512>(v);
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
  return shim_from<__m512i>(o);
}
// the integer form moves the same 128-bit lanes
#define _mm512_shuffle_f32x4(a, b, imm) \
  _mm512_castsi512_ps(_mm512_shuffle_i32x4(_mm512_castps_si512(a), _mm512_castps_si512(b), imm))
#endif

typedef __m512i m512i;
typedef __m512 m512;
typedef __m256i m256i;
typedef __m256 m256;
typedef __m128i m128i;
typedef __m128 m128;
typedef __mmask64 mmask64;

// PIN(x): an empty asm that forces x into a register at this point, so GCC
// cannot reassociate the accumulation chain into add trees (which spills).
#ifdef BITDLM_SIMDE
#define PIN(x) ((void)0)
#else
#define PIN(x) __asm__("" : "+v"(x))
#endif

// Software prefetch into L1 (SIMDe builds use the portable builtin).
#ifdef BITDLM_SIMDE
#define PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)
#else
#define PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
#endif

namespace {

// n (0..64) bytes from p, the rest zero; never reads past p + n.
inline m512i load_bytes(const void* p, int n) {
  const __mmask64 m = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
  return _mm512_maskz_loadu_epi8(m, p);
}

// n (0..16) floats from p, the rest zero.
inline m512 load_floats(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }

// n (0..16) fp16 values from p converted to float, the rest zero.
inline m512 load_halves(const uint16_t* p, int n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
}

inline m512 load_halves16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// Sum of the 16 floats of v.
inline float hsum_ps(m512 v) {
  const m512i vi = _mm512_castps_si512(v);
  const m256 lo = _mm256_castsi256_ps(_mm512_castsi512_si256(vi));
  const m256 hi = _mm256_castsi256_ps(_mm512_extracti64x4_epi64(vi, 1));
  const m256 s8 = _mm256_add_ps(lo, hi);
  m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// int32x16 -> int32x8 (sum of the two halves).
inline m256i fold256(m512i v) {
  return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

// Horizontal sums of 4 int32x16 vectors: lane i of the result = sum of v_i.
inline m128i hsum4_epi32(m512i v0, m512i v1, m512i v2, m512i v3) {
  const m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(fold256(v0), fold256(v1)),
                                       _mm256_hadd_epi32(fold256(v2), fold256(v3)));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

}  // namespace
