// The ternary GEMM driver shared by the AVX2 and AVX-512 kernels: one source,
// compiled per ISA. Included INSIDE each ISA's namespace (avx2, avx512,
// avx512vnni) after that ISA has defined
//   template <int R, int T> void ternary_tile(const uint8_t* w, int64_t wstride,
//       const int8_t* q, int64_t qstride, int nb, int32_t dots[R][8]);
// (exact int32 dots of R packed rows x T tokens over nb 128-weight blocks,
// codes u = t+1), so every function here is a distinct symbol per ISA and
// nothing built with one set of -m flags can be merged into another.
// No include guard on purpose: one inclusion per ISA namespace.

// One R x T tile at (m, n): dots, offset removal and the shared epilogue.
template <int R, int T>
static inline void ternary_store(const TernaryW& w, const ActQ& a, int m, int n, int32_t* out) {
  const int64_t wstride = a.Kp / 4;
  int32_t dots[R][8];
  ternary_tile<R, T>(w.data + (int64_t)m * wstride, wstride, a.q + (int64_t)n * a.Kp, a.Kp, a.Kp / kKBlock, dots);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) ternary_out(w, a, m + r, n + t, dots[r][t] - a.sum[n + t], out);
}

// K-blocked variant for long rows: when the T activation rows do not fit in
// L1 (T * Kp > 24 KiB, e.g. 8 x 6912 B for down_proj), every row tile would
// re-stream them from L2 at one load per multiply, which halves the rate
// (measured on AVX2). So a panel of kPanel rows runs over K in slices of kc
// blocks (T * kc * 128 B = 16 KiB, L1-resident), with int32 partial sums in a
// stack array.
template <int R, int T>
static inline void ternary_rows_kblocked(const TernaryW& w, const ActQ& a, int m0, int m1, int n, int32_t* out) {
  constexpr int kPanel = 32;
  constexpr int kc = 16384 / (T * kKBlock);
  const int64_t wstride = a.Kp / 4;
  const int nb = a.Kp / kKBlock;
  const int8_t* q = a.q + (int64_t)n * a.Kp;
  int32_t acc[kPanel][8];
  int32_t part[R][8];
  for (int mb = m0; mb < m1; mb += kPanel) {
    const int me = mb + kPanel < m1 ? mb + kPanel : m1;
    for (int i = 0; i < me - mb; ++i)
      for (int t = 0; t < T; ++t) acc[i][t] = 0;
    for (int b0 = 0; b0 < nb; b0 += kc) {
      const int len = kc < nb - b0 ? kc : nb - b0;
      int m = mb;
      for (; m + R <= me; m += R) {
        ternary_tile<R, T>(w.data + (int64_t)m * wstride + b0 * 32, wstride, q + b0 * kKBlock, a.Kp, len, part);
        for (int r = 0; r < R; ++r)
          for (int t = 0; t < T; ++t) acc[m - mb + r][t] += part[r][t];
      }
      for (; m < me; ++m) {
        ternary_tile<1, T>(w.data + (int64_t)m * wstride + b0 * 32, wstride, q + b0 * kKBlock, a.Kp, len, part);
        for (int t = 0; t < T; ++t) acc[m - mb][t] += part[0][t];
      }
    }
    for (int i = 0; i < me - mb; ++i)
      for (int t = 0; t < T; ++t) ternary_out(w, a, mb + i, n + t, acc[i][t] - a.sum[n + t], out);
  }
}

// All rows [m0, m1) for the T tokens at n; R rows at a time, then single rows.
template <int R, int T>
static inline void ternary_rows(const TernaryW& w, const ActQ& a, int m0, int m1, int n, int32_t* out) {
  if constexpr (T > 1) {
    if ((int64_t)T * a.Kp > 24576) return ternary_rows_kblocked<R, T>(w, a, m0, m1, n, out);
  }
  int m = m0;
  for (; m + R <= m1; m += R) ternary_store<R, T>(w, a, m, n, out);
  for (; m < m1; ++m) ternary_store<1, T>(w, a, m, n, out);
}
