// The lm_head driver shared by the AVX2 and AVX-512 int8 / fp16 lm_head
// GEMMs: one source, compiled per ISA. Included INSIDE each ISA's namespace
// (like ternary_driver.h), after that ISA has defined
//   constexpr int kLmSlice;  // activation bytes of a K slice (kept in L1)
// and a kernel struct Kern with: Acc / Act types, kWBytes (weight bytes per
// element), kStep (k per vector), kMainR / kMainT (main tile), the weight
// pointer W, stage(n0, n1, kv, stride) -> activations of tokens [n0, n1),
//   template <int R, int T> tile(m, k0, len, act, astride, Acc part[][8])
// (R rows x T tokens over k in [k0, k0 + len), len a multiple of kStep, T <= 8)
// and finish(m, n, kv, acc) (k in [kv, K) and the epilogue); optionally
// kLmFlags (below).
// No include guard on purpose: one inclusion per ISA namespace.

constexpr int kLmPanel = 64, kLmTok = 32;  // max rows per panel, tokens per chunk

// Kern::kLmFlags (optional, default 0): kLmTilePrefetch: its tiles stream
// the next tile's rows themselves, so the panel prefetcher stays off;
// kLmPanelFinish: Kern::finish_panel(mb, me, c0, c1, kv, acc) does a whole
// panel's k tails and epilogue at once (vectorized) instead of finish().
constexpr int kLmTilePrefetch = 1, kLmPanelFinish = 2;
template <class Kern, class = void>
struct LmFlags : std::integral_constant<int, 0> {};
template <class Kern>
struct LmFlags<Kern, std::void_t<decltype(Kern::kLmFlags)>> : std::integral_constant<int, Kern::kLmFlags> {};

// Software prefetch of the next row panel (contiguous bytes), paced by work
// done so the DRAM stream overlaps the whole panel's compute instead of
// arriving in bursts when the first token tile touches the rows.
struct Prefetcher {
  const char* p;
  double per_work;  // bytes to fetch per unit of work
  int64_t done_work = 0, done_bytes = 0;
  void advance(int64_t w) {
    done_work += w;
    const int64_t target = (int64_t)((double)done_work * per_work);
    for (; done_bytes < target; done_bytes += 64) __builtin_prefetch(p + done_bytes, 0, 2);  // prefetcht1
  }
};

// The rows [mb, me) of a panel x tokens [n, n + T) (act: their activations,
// row stride astride) into acc[row][column c..c+T). K is cut into slices whose
// T activation rows fill ~16 KiB, so they stay in L1 while the panel's rows
// (in L2) stream past.
template <int R, int T, class Kern>
static inline void lm_tile_rows(const Kern& kn, int kv, int mb, int me, const typename Kern::Act* act,
                                int64_t astride, typename Kern::Acc (*acc)[kLmTok], int c, Prefetcher& pf) {
  using Acc = typename Kern::Acc;
  constexpr int kc = kLmSlice / (T * (int)sizeof(typename Kern::Act)) / Kern::kStep * Kern::kStep;
  Acc part[R][8];
  for (int k0 = 0; k0 < kv; k0 += kc) {
    const int len = kc < kv - k0 ? kc : kv - k0;
    int m = mb;
    for (; m + R <= me; m += R) {
      kn.template tile<R, T>(m, k0, len, act + k0, astride, part);
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[m - mb + r][c + t] += part[r][t];
      pf.advance((int64_t)R * T * len);
    }
    for (; m < me; ++m) {
      kn.template tile<1, T>(m, k0, len, act + k0, astride, part);
      for (int t = 0; t < T; ++t) acc[m - mb][c + t] += part[0][t];
      pf.advance((int64_t)T * len);
    }
  }
}

// Rows [m0, m1), all N tokens: chunks of kLmTok tokens, then panels of rows
// (~40 KiB, kept in L2 for all token tiles of the chunk), then token tiles.
template <class Kern>
static void lm_head(const Kern& kn, int K, int N, int m0, int m1) {
  using Acc = typename Kern::Acc;
  constexpr int RM = Kern::kMainR, TM = Kern::kMainT;
  const int kv = K / Kern::kStep * Kern::kStep;
  const int64_t row_bytes = (int64_t)K * Kern::kWBytes;
  int P = (int)(40960 / row_bytes) / 4 * 4;
  P = P < 4 ? 4 : (P > kLmPanel ? kLmPanel : P);
  Acc acc[kLmPanel][kLmTok];
  for (int c0 = 0; c0 < N; c0 += kLmTok) {
    const int c1 = c0 + kLmTok < N ? c0 + kLmTok : N;
    int64_t astride;
    const typename Kern::Act* act = kn.stage(c0, c1, kv, astride);
    for (int mb = m0; mb < m1; mb += P) {
      const int me = mb + P < m1 ? mb + P : m1;
      // (decode, one token: the 4 x 1 tile prefetches its next rows itself)
      Prefetcher pf{(const char*)kn.W + me * row_bytes,
                    c1 - c0 == 1 || (LmFlags<Kern>::value & kLmTilePrefetch) ? 0.0 : (double)P * row_bytes / ((double)(me - mb) * (c1 - c0) * (kv > 0 ? kv : 1))};
      for (int i = 0; i < me - mb; ++i)
        for (int t = 0; t < c1 - c0; ++t) acc[i][t] = 0;
      int n = c0;
      const auto run = [&](auto tile_rows) {
        tile_rows(kn, kv, mb, me, act + (n - c0) * astride, astride, acc, n - c0, pf);
      };
      for (; n + TM <= c1; n += TM) run(lm_tile_rows<RM, TM, Kern>);
      for (; n + 4 <= c1; n += 4) run(lm_tile_rows<2, 4, Kern>);
      switch (c1 - n) {
        case 3: run(lm_tile_rows<2, 3, Kern>); break;
        case 2: run(lm_tile_rows<2, 2, Kern>); break;
        case 1: run(lm_tile_rows<4, 1, Kern>); break;
        default: break;
      }
      if constexpr ((LmFlags<Kern>::value & kLmPanelFinish) != 0)
        kn.finish_panel(mb, me, c0, c1, kv, acc);
      else
        for (int i = 0; i < me - mb; ++i)
          for (int t = 0; t < c1 - c0; ++t) kn.finish(mb + i, c0 + t, kv, acc[i][t]);
    }
  }
}

