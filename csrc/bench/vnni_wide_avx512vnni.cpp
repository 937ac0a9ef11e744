// Bench-only AVX-512 VNNI ternary kernels with wide token tiles (the Zen 4
// path: AVX-512 VNNI, no AMX; BITDLM_BENCH_KERNELS builds, never shipped).
//
// Why: the shipped VNNI tile (gemm_avx512.inc, 4 rows x 4 tokens) spends per
// 128-k block and row 2 vpsrlvq + 2 vpandq on the unpack for 2 x 4 vpdpbusd.
// On Sapphire Rapids the 512-bit shift and vpdpbusd share port 0, so at most
// 32 of every 40 port-0 uops are MACs (80%); K1 measured 66% of the vpdpbusd
// peak at N = 32. Reusing one unpacked row for T = 8..16 tokens (ik_llama.cpp's
// point: unpack once, multiply with several activation columns; its _R4 rows
// get the same reuse from one broadcast activation feeding 4 interleaved
// rows) cuts the unpack share to 1/(T + 1) of port 0 (T = 8: 89%, T = 16: 94%)
// with the same i2_b128 weights (no second layout, no load-time cost). Lookup
// tables (TL2, T-MAC) do not pay here: an exact int16 partial-sum table needs
// two byte lookups (low / high byte) plus the widening per 64 lookups, i.e.
// <= 48 MACs per vector op against 64 for one vpdpbusd (docs/kernels.md).
//
// Activations of the T tokens are read as vpdpbusd memory operands; when
// T x Kp exceeds kSlice bytes (L1) the 32-row panel walks K in slices with
// int32 partial sums, as ternary_driver.h does. Token tails (N mod T) run the
// shipped VNNI kernel, so every dot is exact int32 and the epilogue is
// epilogue.h's: bit-identical to scalar (tests/simde/harness.cpp, natively
// tests/test_kernels.py).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels/epilogue.h"
#include "kernels/isa.h"
#include "kernels/simd512.h"

namespace bitdlm {
namespace vnni_wide {

using TernaryFn = void (*)(const TernaryW&, const ActQ&, int, int, int, int, int32_t*);

constexpr int kSlice = 24576;  // activation bytes of a K slice (Zen 4 L1d: 32 KiB)
constexpr int kPanel = 32;     // rows sharing one K slice of activations

// dots[r * T + t] += dot(u[m + r], q[t]) over blocks [0, nb) of the slice.
template <int R, int T>
static inline void tile(const uint8_t* __restrict w, int64_t wstride, const int8_t* __restrict q, int64_t qstride,
                        int nb, int32_t* __restrict dots) {
  static_assert(T % 4 == 0, "hsum4 groups");
  const m512i mask = _mm512_set1_epi8(3);
  const m512i cnt01 = _mm512_inserti64x4(_mm512_set1_epi64(0), _mm256_set1_epi64x(2), 1);
  const m512i cnt23 = _mm512_inserti64x4(_mm512_set1_epi64(4), _mm256_set1_epi64x(6), 1);
  m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int b = 0; b < nb; ++b) {
    m512i u01[R], u23[R];
    for (int r = 0; r < R; ++r) {
      const m512i p = _mm512_broadcast_i64x4(_mm256_loadu_si256((const m256i*)(w + r * wstride + b * 32)));
      u01[r] = _mm512_and_si512(_mm512_srlv_epi64(p, cnt01), mask);
      u23[r] = _mm512_and_si512(_mm512_srlv_epi64(p, cnt23), mask);
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* qa = q + t * qstride + b * kKBlock;
      const m512i a0 = _mm512_loadu_si512(qa), a1 = _mm512_loadu_si512(qa + 64);
      for (int r = 0; r < R; ++r)
        acc[r][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][t], u01[r], a0), u23[r], a1);
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) PIN(acc[r][t]);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; t += 4) {
      int32_t s[4];
      _mm_storeu_si128((m128i*)s, hsum4_epi32(acc[r][t], acc[r][t + 1], acc[r][t + 2], acc[r][t + 3]));
      for (int i = 0; i < 4; ++i) dots[r * T + t + i] += s[i];
    }
}

// Rows [m0, m1) x tokens [n, n + T): 32-row panels over K slices.
template <int R, int T>
static void rows(const TernaryW& w, const ActQ& a, int m0, int m1, int n, int32_t* out) {
  const int64_t wstride = a.Kp / 4;
  const int nb = a.Kp / kKBlock;
  const int kc = kSlice / (T * kKBlock) < nb ? kSlice / (T * kKBlock) : nb;
  const int8_t* q = a.q + (int64_t)n * a.Kp;
  int32_t acc[kPanel * T];
  for (int mb = m0; mb < m1; mb += kPanel) {
    const int me = mb + kPanel < m1 ? mb + kPanel : m1;
    for (int i = 0; i < (me - mb) * T; ++i) acc[i] = 0;
    for (int b0 = 0; b0 < nb; b0 += kc) {
      const int len = kc < nb - b0 ? kc : nb - b0;
      const uint8_t* wb = w.data + b0 * 32;
      int m = mb;
      for (; m + R <= me; m += R)
        tile<R, T>(wb + (int64_t)m * wstride, wstride, q + b0 * kKBlock, a.Kp, len, acc + (m - mb) * T);
      for (; m < me; ++m)
        tile<1, T>(wb + (int64_t)m * wstride, wstride, q + b0 * kKBlock, a.Kp, len, acc + (m - mb) * T);
    }
    for (int i = 0; i < me - mb; ++i)
      for (int t = 0; t < T; ++t) ternary_out(w, a, mb + i, n + t, acc[i * T + t] - a.sum[n + t], out);
  }
}

// The KernelTable::ternary contract: rows [m0, m1) x tokens [n0, n1).
template <int R, int T>
static void wide(const TernaryW& w, const ActQ& a, int m0, int m1, int n0, int n1, int32_t* out) {
  int n = n0;
  for (; n + T <= n1; n += T) rows<R, T>(w, a, m0, m1, n, out);
  if constexpr (T > 8)
    for (; n + 8 <= n1; n += 8) rows<2, 8>(w, a, m0, m1, n, out);
  if (n < n1) kAvx512VnniKernels.ternary(w, a, m0, m1, n, n1, out);  // < 8 tokens: the shipped tiles
}

}  // namespace vnni_wide

// bind_bench.cpp's kernels "vnni_w2x8", "vnni_w1x16", "vnni_w2x12" (R rows x T tokens).
extern const vnni_wide::TernaryFn kVnniWideKernels[3] = {&vnni_wide::wide<2, 8>, &vnni_wide::wide<1, 16>,
                                                         &vnni_wide::wide<2, 12>};

}  // namespace bitdlm
