// AVX-512 shim: the same kernel source (gemm_avx512.inc) compiles against the
// real intrinsics (the module, with -mavx512* flags) or against SIMDe
// (tests/simde harness, -DBITDLM_SIMDE, no AVX-512 flags), so its logic is
// tested bit-exactly on machines without AVX-512.
//
// Kernel code writes every intrinsic as V(_mm512_xxx)(...). SIMDe 0.7.4 lacks
// masked loads, _mm512_cvtph_ps and the reduce_add helpers, so those are
// helpers here. Everything is static: each ISA translation unit keeps its own
// copy (no inline symbol shared between files built with different flags).
#pragma once
#include <cstdint>
#include <cstring>

#ifdef BITDLM_SIMDE
#include <simde/x86/avx2.h>
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#define V(name) simde##name
typedef simde__m512i m512i;
typedef simde__m512 m512;
typedef simde__m256i m256i;
typedef simde__m256 m256;
typedef simde__m128i m128i;
typedef simde__m128 m128;
typedef simde__mmask64 mmask64;
#else
#include <immintrin.h>
#define V(name) name
typedef __m512i m512i;
typedef __m512 m512;
typedef __m256i m256i;
typedef __m256 m256;
typedef __m128i m128i;
typedef __m128 m128;
typedef __mmask64 mmask64;
#endif

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
#ifdef BITDLM_SIMDE
  alignas(64) uint8_t buf[64] = {};
  std::memcpy(buf, p, (size_t)n);
  return V(_mm512_loadu_si512)(buf);
#else
  const __mmask64 m = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
  return _mm512_maskz_loadu_epi8(m, p);
#endif
}

// n (0..16) floats from p, the rest zero.
inline m512 load_floats(const float* p, int n) {
#ifdef BITDLM_SIMDE
  alignas(64) float buf[16] = {};
  std::memcpy(buf, p, sizeof(float) * (size_t)n);
  return V(_mm512_loadu_ps)(buf);
#else
  return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
#endif
}

// n (0..16) fp16 values from p converted to float, the rest zero.
inline m512 load_halves(const uint16_t* p, int n) {
#ifdef BITDLM_SIMDE
  alignas(32) uint16_t h[16] = {};
  std::memcpy(h, p, 2 * (size_t)n);
  alignas(64) float f[16];
  V(_mm256_storeu_ps)(f, V(_mm256_cvtph_ps)(V(_mm_loadu_si128)(h)));
  V(_mm256_storeu_ps)(f + 8, V(_mm256_cvtph_ps)(V(_mm_loadu_si128)(h + 8)));
  return V(_mm512_loadu_ps)(f);
#else
  const __mmask16 m = (__mmask16)((1u << n) - 1);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
#endif
}

inline m512 load_halves16(const uint16_t* p) {
#ifdef BITDLM_SIMDE
  return load_halves(p, 16);
#else
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#endif
}

// Sum of the 16 floats of v.
inline float hsum_ps(m512 v) {
  const m512i vi = V(_mm512_castps_si512)(v);
  const m256 lo = V(_mm256_castsi256_ps)(V(_mm512_castsi512_si256)(vi));
  const m256 hi = V(_mm256_castsi256_ps)(V(_mm512_extracti64x4_epi64)(vi, 1));
  const m256 s8 = V(_mm256_add_ps)(lo, hi);
  m128 s = V(_mm_add_ps)(V(_mm256_castps256_ps128)(s8), V(_mm256_extractf128_ps)(s8, 1));
  s = V(_mm_add_ps)(s, V(_mm_movehl_ps)(s, s));
  s = V(_mm_add_ss)(s, V(_mm_movehdup_ps)(s));
  return V(_mm_cvtss_f32)(s);
}

// int32x16 -> int32x8 (sum of the two halves).
inline m256i fold256(m512i v) {
  return V(_mm256_add_epi32)(V(_mm512_castsi512_si256)(v), V(_mm512_extracti64x4_epi64)(v, 1));
}

// Horizontal sums of 4 int32x16 vectors: lane i of the result = sum of v_i.
inline m128i hsum4_epi32(m512i v0, m512i v1, m512i v2, m512i v3) {
  const m256i h = V(_mm256_hadd_epi32)(V(_mm256_hadd_epi32)(fold256(v0), fold256(v1)),
                                       V(_mm256_hadd_epi32)(fold256(v2), fold256(v3)));
  return V(_mm_add_epi32)(V(_mm256_castsi256_si128)(h), V(_mm256_extracti128_si256)(h, 1));
}

}  // namespace
