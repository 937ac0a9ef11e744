// AVX2 kernels (compiled with -mavx2 -mfma -mf16c; reached only through
// kAvx2Kernels after the cpuid check in dispatch.cpp).
//
// Ternary x int8: codes u = t+1 in {0,1,2} are u8, activations s8, so
// _mm256_maddubs_epi16(u, a) gives int16 pair sums in [-512, 508]. Each (row,
// token) accumulator adds 4 of them per 128-weight block; it is widened to
// int32 (madd with ones) every kChunk = 8 blocks, i.e. after at most 32 adds
// (|sum| <= 16384 < 32767: no overflow for any K). The +1 offset is removed at
// the end with the token's code sum: dot(t, a) = dot(u, a) - sum(a).
//
// Register tile: R rows x T tokens. A block of R packed rows is loaded once,
// each of its 4 32-code groups is unpacked (shift + mask) once and used for all
// T tokens; activations are maddubs memory operands. Main tile 1 x 8 (8 int16
// accumulators, ~2.25 vector ops per maddubs; measured ~10% faster than 2 x 4
// at N = 32), then 2 x 4, 2 x 3, 2 x 2 for the token tail and 1 x 1 for
// decode. The tile loop runs tokens outer / rows inner, so the T activation
// rows stay in L1 while the job's weight rows (<= 32 rows) stay in L1/L2;
// rows too long for that are K-blocked (ternary_rows_kblocked, in the
// driver shared with AVX-512: kernels/ternary_driver.h).
#include <immintrin.h>

#include "kernels/epilogue.h"
#include "kernels/isa.h"

namespace bitdlm {
namespace avx2 {

constexpr int kChunk = 8;  // blocks between int16 -> int32 widenings (see above)
// Decode (one token) runs 1-row tiles: the same vector ops per weight as 4-row
// tiles (the activation load is a memory operand either way) but a single
// forward stream through the matrix, fetched kPfRows rows ahead. A/B over the
// 30 layers of the 2B shape, 1 thread: 4 x 1 tiles 2 tiles ahead 6.5-7.0 GB/s,
// 1 x 1 tiles 4 rows ahead 8.0 GB/s (no prefetch: 3.5 and 7.2). 16 rows (as the
// AVX-512 decode tile) since gemv_tile's one-shift unpack: 0.97-0.99x the time of 4
// on a Zen 5 core (bench/gemm_ab.py --isa avx2 --n 1), nothing before it.
constexpr int kPfRows = 16;

// Horizontal sums of 4 int32x8 vectors -> one int32x4 (lane i = sum of v_i).
static inline __m128i hsum4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// Decode, one row x one token: the exact int32 dot of a packed row over nb blocks.
// Groups 1 and 3 are masked in place (codes x 4 in bits 2-3, the AVX-512 VNNI
// tile's one-shift unpack) instead of shifted down: a block costs 1 shift and 4
// ands, not 3 and 4, on a path that is ALU-bound on one core (~15 vector ops per
// 32 weight bytes). Their pair sums (x 4) go to a second int16 accumulator,
// |s1 + s3| <= 2 x 2032 a block, x kChunk 8 = 32512 < 32767 (codes in [-127,
// 127]); the first (|s0 + s2| <= 1016 a block) is widened times 4, so the int32
// lanes hold 4 x the dot, shifted back (exactly) at the end. Two pair-sum
// accumulators also halve the dependent adds per block (the 4 sequential adds
// into one accumulator were a latency chain).
static inline int32_t gemv_tile(const uint8_t* __restrict w, int64_t wstride, const int8_t* __restrict q, int nb) {
  const __m256i m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12);
  const __m256i ones = _mm256_set1_epi16(1), fours = _mm256_set1_epi16(4);
  __m256i acc32 = _mm256_setzero_si256();
  for (int b0 = 0; b0 < nb; b0 += kChunk) {
    const int b1 = b0 + kChunk < nb ? b0 + kChunk : nb;
    __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
    for (int b = b0; b < b1; ++b) {
      // decode streams the weights from DRAM with no reuse; rows are short (640 B at
      // K = 2560), so help the prefetcher: fetch kPfRows rows ahead (prefetches never
      // fault past the end of the matrix)
      if (!(b & 1)) _mm_prefetch((const char*)(w + kPfRows * wstride + b * 32), _MM_HINT_T0);
      const __m256i p = _mm256_loadu_si256((const __m256i*)(w + b * 32));
      const __m256i p4 = _mm256_srli_epi16(p, 4);
      const __m256i* a = (const __m256i*)(q + b * kKBlock);
      const __m256i s0 = _mm256_maddubs_epi16(_mm256_and_si256(p, m3), _mm256_loadu_si256(a));
      const __m256i s1 = _mm256_maddubs_epi16(_mm256_and_si256(p, m12), _mm256_loadu_si256(a + 1));
      const __m256i s2 = _mm256_maddubs_epi16(_mm256_and_si256(p4, m3), _mm256_loadu_si256(a + 2));
      const __m256i s3 = _mm256_maddubs_epi16(_mm256_and_si256(p4, m12), _mm256_loadu_si256(a + 3));
      lo = _mm256_add_epi16(lo, _mm256_add_epi16(s0, s2));
      hi = _mm256_add_epi16(hi, _mm256_add_epi16(s1, s3));
    }
    acc32 = _mm256_add_epi32(acc32, _mm256_add_epi32(_mm256_madd_epi16(lo, fours), _mm256_madd_epi16(hi, ones)));
  }
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc32), _mm256_extracti128_si256(acc32, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s) >> 2;  // (4 x the dot: exact)
}

// Exact int32 dots of R packed rows x T tokens over nb blocks -> dots[r][t].
template <int R, int T>
static inline void ternary_tile(const uint8_t* __restrict w, int64_t wstride, const int8_t* __restrict q,
                                int64_t qstride, int nb, int32_t dots[R][8]) {
  if constexpr (R * T == 1) {
    dots[0][0] = gemv_tile(w, wstride, q, nb);
    return;
  }
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc32[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc32[r][t] = _mm256_setzero_si256();
  for (int b0 = 0; b0 < nb; b0 += kChunk) {
    const int b1 = b0 + kChunk < nb ? b0 + kChunk : nb;
    __m256i acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
    for (int b = b0; b < b1; ++b) {
      __m256i p[R];
      for (int r = 0; r < R; ++r) p[r] = _mm256_loadu_si256((const __m256i*)(w + r * wstride + b * 32));
      for (int i = 0; i < 4; ++i) {
        __m256i u[R];
        for (int r = 0; r < R; ++r) u[r] = _mm256_and_si256(_mm256_srli_epi16(p[r], 2 * i), mask);
        for (int t = 0; t < T; ++t) {
          const __m256i a = _mm256_loadu_si256((const __m256i*)(q + t * qstride + b * kKBlock + 32 * i));
          for (int r = 0; r < R; ++r) acc[r][t] = _mm256_add_epi16(acc[r][t], _mm256_maddubs_epi16(u[r], a));
        }
        // Empty asm pins the accumulators after each group: without it GCC
        // reassociates the 4 groups' maddubs into add trees and spills.
        for (int r = 0; r < R; ++r)
          for (int t = 0; t < T; ++t) __asm__("" : "+x"(acc[r][t]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc32[r][t] = _mm256_add_epi32(acc32[r][t], _mm256_madd_epi16(acc[r][t], ones));
  }
  const __m256i z = _mm256_setzero_si256();
  for (int r = 0; r < R; ++r) {
    const __m128i s = hsum4(acc32[r][0], T > 1 ? acc32[r][T > 1 ? 1 : 0] : z, T > 2 ? acc32[r][T > 2 ? 2 : 0] : z,
                            T > 3 ? acc32[r][T > 3 ? 3 : 0] : z);
    _mm_storeu_si128((__m128i*)dots[r], s);
    if (T > 4)
      _mm_storeu_si128((__m128i*)(dots[r] + 4),
                       hsum4(acc32[r][T > 4 ? 4 : 0], T > 5 ? acc32[r][T > 5 ? 5 : 0] : z,
                             T > 6 ? acc32[r][T > 6 ? 6 : 0] : z, T > 7 ? acc32[r][T > 7 ? 7 : 0] : z));
  }
}

// L1 budget of the driver's row panels (32 KiB L1d on Zen 3): the T
// activation rows whole up to 24 KiB, else K slices of 16 KiB (measured).
constexpr int kActFit = 24576, kActSlice = 16384;
#include "kernels/ternary_driver.h"

static void ternary(const TernaryW& w, const ActQ& a, int m0, int m1, int n0, int n1, int32_t* out) {
  int n = n0;
  for (; n + 8 <= n1; n += 8) ternary_rows<1, 8>(w, a, m0, m1, n, out);
  for (; n + 4 <= n1; n += 4) ternary_rows<2, 4>(w, a, m0, m1, n, out);
  switch (n1 - n) {
    case 3: ternary_rows<2, 3>(w, a, m0, m1, n, out); break;
    case 2: ternary_rows<2, 2>(w, a, m0, m1, n, out); break;
    case 1: ternary_rows<1, 1>(w, a, m0, m1, n, out); break;
    default: break;
  }
}

// ---------------------------------------------------------------- lm_head

// Horizontal sums of 4 float x8 vectors -> one float x4 (lane i = sum of v_i).
static inline __m128 hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Stores the lane sums of acc[0..T) (T <= 8) into out[0..T).
template <int T, class V, class S>
static inline void hsum_store(const V (&acc)[T], S* out) {
  static_assert(sizeof(S) == 4, "int32 or float lanes");
  V z;
  __builtin_memset(&z, 0, sizeof z);
  const auto at = [&](int i) { return i < T ? acc[i < T ? i : 0] : z; };
  const auto h0 = hsum4(at(0), at(1), at(2), at(3));
  __builtin_memcpy(out, &h0, 4 * (T < 4 ? T : 4));
  if constexpr (T > 4) {
    const auto h1 = hsum4(at(4), at(5), at(6), at(7));
    __builtin_memcpy(out + 4, &h1, 4 * (T - 4));
  }
}

// lm_head tiles. Both GEMMs share one driver (lm_head below) and differ in
// the R x T register tile over k in [k0, k0 + len) (len a multiple of kStep):
// each weight vector is loaded and prepared (abs / fp16 -> fp32) once and used
// for the T tokens, whose activations are memory operands.
//
// Main tiles: i8 1 x 8 and f16 4 x 2 measured best in A/B builds (f16 1 x 8,
// 2 x 4, 2 x 6, 3 x 4, 4 x 3 were slower; docs/kernels.md).
constexpr int kLmSlice = 24576;  // activation bytes of a K slice (L1 is 32 KiB)

// int8: |w| (u8) x sign(a, w) (s8) with maddubs, widened to int32 at once with
// madd (a pair sum reaches 2*128*127 = 32512, so two of them could overflow
// int16). (Sign-extending both to int16 and using madd alone measured no faster.)
struct I8Kern {
  using Acc = int32_t;
  using Act = int8_t;
  static constexpr int kWBytes = 1;
  static constexpr int kStep = 32;  // k per vector
  static constexpr int kMainR = 1, kMainT = 8;
  const int8_t* W;
  const float* wscale;
  int K;
  const ActQ& a;
  float* y;
  int ldy;

  const Act* stage(int n0, int, int, int64_t& stride) const {
    stride = a.Kp;
    return a.q + (int64_t)n0 * a.Kp;
  }

  template <int R, int T>
  void tile(int m, int k0, int len, const Act* act, int64_t astride, Acc part[][8]) const {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
    const int8_t* wr = W + (int64_t)m * K + k0;
    for (int k = 0; k < len; k += 32) {
      if constexpr (T == 1)  // decode: no reuse, fetch the rows of the next tile
        if (!(k & 63))
          for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wr + (int64_t)(r + R) * K + k), _MM_HINT_T0);
      __m256i ws[R], wa[R];
      for (int r = 0; r < R; ++r) {
        ws[r] = _mm256_loadu_si256((const __m256i*)(wr + (int64_t)r * K + k));
        wa[r] = _mm256_abs_epi8(ws[r]);
      }
      for (int t = 0; t < T; ++t) {
        const __m256i av = _mm256_loadu_si256((const __m256i*)(act + t * astride + k));
        for (int r = 0; r < R; ++r)
          acc[r][t] = _mm256_add_epi32(
              acc[r][t], _mm256_madd_epi16(_mm256_maddubs_epi16(wa[r], _mm256_sign_epi8(av, ws[r])), ones));
      }
    }
    for (int r = 0; r < R; ++r) hsum_store<T>(acc[r], part[r]);
  }

  // k in [kv, K) (scalar tail), then dequantize.
  void finish(int m, int n, int kv, Acc d) const {
    for (int k = kv; k < K; ++k) d += (int32_t)W[(int64_t)m * K + k] * a.q[(int64_t)n * a.Kp + k];
    i8_out(wscale, a, y, ldy, m, n, d);
  }
};

// fp16: R weight vectors converted once per 8 k (F16C), FMA'd into T tokens.
struct F16Kern {
  using Acc = float;
  static constexpr int kWBytes = 2;
  using Act = float;
  static constexpr int kStep = 8;
  static constexpr int kMainR = 4, kMainT = 2;
  const uint16_t* W;
  int K;
  const float* x;
  float* y;
  int ldy;

  const Act* stage(int n0, int, int, int64_t& stride) const {
    stride = K;
    return x + (int64_t)n0 * K;
  }

  template <int R, int T>
  void tile(int m, int k0, int len, const Act* xr, int64_t xstride, Acc part[][8]) const {
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    const uint16_t* wr = W + (int64_t)m * K + k0;
    for (int k = 0; k < len; k += 8) {
      if constexpr (T == 1)  // decode: no reuse, fetch the rows of the next tile
        if (!(k & 31))
          for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wr + (int64_t)(r + R) * K + k), _MM_HINT_T0);
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wr + (int64_t)r * K + k)));
      for (int t = 0; t < T; ++t) {
        const __m256 xv = _mm256_loadu_ps(xr + t * xstride + k);
        for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
      }
    }
    for (int r = 0; r < R; ++r) hsum_store<T>(acc[r], part[r]);
  }

  void finish(int m, int n, int kv, Acc s) const {
    for (int k = kv; k < K; ++k) s += half_to_float(W[(int64_t)m * K + k]) * x[(int64_t)n * K + k];
    y[(int64_t)n * ldy + m] = s;
  }
};

#include "kernels/lm_driver.h"

static void f16(const uint16_t* W, int K, const float* x, int N, float* y, int ldy, int m0, int m1) {
  lm_head(F16Kern{W, K, x, y, ldy}, K, N, m0, m1);
}

static void i8(const int8_t* W, const float* wscale, int K, const ActQ& a, float* y, int ldy, int m0, int m1) {
  lm_head(I8Kern{W, wscale, K, a, y, ldy}, K, a.N, m0, m1);
}

// ---------------------------------------------------------------- quantizer

// Same arithmetic as the scalar quantizer, 8 lanes at a time: |x| max is
// exact, x * s is one IEEE multiply, _mm256_round_ps(nearest) is round half to
// even like nearbyintf, so the codes are bit-identical.
static void quantize(const float* x, int N, int K, int Kp, int8_t* q, float* scale, int32_t* sum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int n = 0; n < N; ++n) {
    const float* xr = x + (int64_t)n * K;
    int8_t* qr = q + (int64_t)n * Kp;
    __m256 vmax = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xr + k), absmask));
    float m8[8];
    _mm256_storeu_ps(m8, vmax);
    float amax = 0.f;
    for (int i = 0; i < 8; ++i) amax = amax > m8[i] ? amax : m8[i];
    for (; k < K; ++k) {
      const float v = xr[k] < 0 ? -xr[k] : xr[k];
      amax = amax > v ? amax : v;
    }
    const float s = (1.0f / (amax > 1e-5f ? amax : 1e-5f)) * 127.0f;  // as torch rounds 127 / amax
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
    __m256i vsum = _mm256_setzero_si256();
    k = 0;
    for (; k + 32 <= K; k += 32) {
      __m256i c[4];
      for (int j = 0; j < 4; ++j) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8 * j), vs),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        c[j] = _mm256_cvtps_epi32(r);
        vsum = _mm256_add_epi32(vsum, c[j]);
      }
      // packs work per 128-bit lane: fix the order with one dword permute
      const __m256i p16a = _mm256_packs_epi32(c[0], c[1]), p16b = _mm256_packs_epi32(c[2], c[3]);
      const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
      _mm256_storeu_si256((__m256i*)(qr + k),
                          _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    int32_t s8[8];
    _mm256_storeu_si256((__m256i*)s8, vsum);
    int32_t acc = 0;
    for (int i = 0; i < 8; ++i) acc += s8[i];
    for (; k < K; ++k) {
      float r = _mm_cvtss_f32(_mm_round_ss(_mm_setzero_ps(), _mm_set_ss(xr[k] * s),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      r = r < -128.f ? -128.f : (r > 127.f ? 127.f : r);
      qr[k] = (int8_t)r;
      acc += qr[k];
    }
    for (k = K; k < Kp; ++k) qr[k] = 0;
    scale[n] = s;
    sum[n] = acc;
  }
}

}  // namespace avx2

extern const KernelTable kAvx2Kernels = {&avx2::ternary, &avx2::f16, &avx2::i8, &avx2::quantize, nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace bitdlm
