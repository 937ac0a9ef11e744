// The ternary GEMM driver shared by the AVX2, AVX-512 and ARM kernels: one
// source, compiled per ISA. Included INSIDE each ISA's namespace (avx2,
// avx512, avx512vnni, neon, ...) after that ISA has defined
//   template <int R, int T> void ternary_tile(const uint8_t* w, int64_t wstride,
//       const int8_t* q, int64_t qstride, int nb, int32_t dots[R][8]);
// (exact int32 dots of R packed rows x T <= 8 tokens over nb 128-weight
// blocks, codes u = t+1) and
//   constexpr int kActFit, kActSlice;
// (activation bytes T x Kp up to which a panel runs over all of K at once, and
// the bytes of one K slice beyond that: both L1-resident), so every function
// here is a distinct symbol per ISA and nothing built with one set of -m
// flags can be merged into another. No include guard on purpose: one
// inclusion per ISA namespace.

// One R x T tile at (m, n): dots, offset removal and the shared epilogue
// (decode: one token, where a panel would only add a copy).
template <int R, int T>
static inline void ternary_store(const TernaryW& w, const ActQ& a, int m, int n, int32_t* out) {
  const int64_t wstride = a.Kp / 4;
  int32_t dots[R][8];
  ternary_tile<R, T>(w.data + (int64_t)m * wstride, wstride, a.q + (int64_t)n * a.Kp, a.Kp, a.Kp / kKBlock, dots);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) ternary_out(w, a, m + r, n + t, dots[r][t] - a.sum[n + t], out);
}

// Several tokens: panels of kPanel rows (a dispatch job is one panel). A panel
// runs its R-row tiles over K in slices of kc blocks whose T activation rows
// stay in L1 (the whole row when T * Kp <= kActFit; otherwise every row tile
// would re-stream them from L2 at one load per multiply, which halves the
// rate, measured on AVX2), with int32 partial sums per (token, row) in a
// stack array. The panel's dots are then dequantized a token row of kPanel
// outputs at a time (ternary_out_row: a loop the compiler vectorizes, where a
// scalar division per output cost ~15% of the 2 x 8 VNNI tile's time).
template <int R, int T>
static inline void ternary_rows_panel(const TernaryW& w, const ActQ& a, int m0, int m1, int n, int32_t* out) {
  constexpr int kPanel = 32;
  const int64_t wstride = a.Kp / 4;
  const int nb = a.Kp / kKBlock;
  const int kc = (int64_t)T * a.Kp <= kActFit ? nb : kActSlice / (T * kKBlock);
  const int8_t* q = a.q + (int64_t)n * a.Kp;
  int32_t acc[T][kPanel];
  int32_t part[R][8];
  for (int mb = m0; mb < m1; mb += kPanel) {
    const int me = mb + kPanel < m1 ? mb + kPanel : m1;
    for (int b0 = 0; b0 < nb; b0 += kc) {
      const int len = kc < nb - b0 ? kc : nb - b0;
      auto add = [&](int i, int rows) {  // the first slice stores, the others add
        for (int r = 0; r < rows; ++r)
          for (int t = 0; t < T; ++t) acc[t][i + r] = (b0 ? acc[t][i + r] : 0) + part[r][t];
      };
      int m = mb;
      for (; m + R <= me; m += R) {
        ternary_tile<R, T>(w.data + (int64_t)m * wstride + b0 * 32, wstride, q + b0 * kKBlock, a.Kp, len, part);
        add(m - mb, R);
      }
      for (; m < me; ++m) {
        ternary_tile<1, T>(w.data + (int64_t)m * wstride + b0 * 32, wstride, q + b0 * kKBlock, a.Kp, len, part);
        add(m - mb, 1);
      }
    }
    for (int t = 0; t < T; ++t) ternary_out_row(w, a, mb, me - mb, n + t, acc[t], out);
  }
}

// All rows [m0, m1) for the T tokens at n; R rows at a time, then single rows.
template <int R, int T>
static inline void ternary_rows(const TernaryW& w, const ActQ& a, int m0, int m1, int n, int32_t* out) {
  if constexpr (T > 1) {
    ternary_rows_panel<R, T>(w, a, m0, m1, n, out);
  } else {
    int m = m0;
    for (; m + R <= m1; m += R) ternary_store<R, T>(w, a, m, n, out);
    for (; m < m1; ++m) ternary_store<1, T>(w, a, m, n, out);
  }
}
