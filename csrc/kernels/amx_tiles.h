// AMX tile pieces shared by the shipped AMX kernel (gemm_amx.cpp) and the
// bench-only variants (csrc/bench/amx_variants_amx.cpp, BITDLM_BENCH_KERNELS):
// tile config, the activation re-layout, the per-block weight unpack, one
// block's TDPBUSDs, the C-tile epilogue and the K-sliced job walker.
// Included INSIDE namespace bitdlm::amx of an AMX-flagged file (after
// simd512.h and epilogue.h); everything is static, so each file keeps its own
// copy. No include guard on purpose: one inclusion per file.
// The tile intrinsics are <immintrin.h>'s, or the emulator's that
// tests/simde/harness.cpp injects with -include tests/simde/amx_emu.h.

constexpr int kTileK = 64;     // bytes (k values) per tile row
constexpr int kTileRows = 16;  // rows per tile
constexpr int kTileBytes = kTileRows * kTileK;

// LDTILECFG's 64-byte operand (Intel SDM vol. 1, 3.1: palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];  // bytes per row of tmm i
  uint8_t rows[16];    // rows of tmm i
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG operand is 64 bytes");

// Every tile the kernels use is a full 16 x 64-byte tile (tails are zero
// padded in memory instead of shrinking tiles, so one config serves all).
static void tile_begin() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = kTileK;
    cfg.rows[i] = kTileRows;
  }
  _tile_loadconfig(&cfg);
}

static void tile_end() { _tile_release(); }

// Activation re-layout: tile (token group g, k step s) of buf, 1 KiB, row r =
// for tokens j = 16g..16g+15 the 4 codes k = 64s + 4r .. 64s + 4r + 3
// (tokens >= N are zero). buf is laid out [g][s] so a job's tiles for one
// token group are contiguous in s.
static void act_vnni(const ActQ& a, int g, int s, int8_t* buf) {
  const int S = a.Kp / kTileK;
  uint32_t* dst = (uint32_t*)(buf + ((int64_t)g * S + s) * kTileBytes);
  for (int j = 0; j < kTileRows; ++j) {
    const int n = g * kTileRows + j;
    if (n < a.N) {
      const int8_t* src = a.q + (int64_t)n * a.Kp + s * kTileK;
      for (int r = 0; r < kTileRows; ++r) std::memcpy(dst + r * kTileRows + j, src + 4 * r, 4);
    } else {
      for (int r = 0; r < kTileRows; ++r) dst[r * kTileRows + j] = 0;
    }
  }
}

// The i2_b128 shift trick: a 32-byte block broadcast to a zmm and shifted by
// 0 | 2 (lo) resp. 4 | 6 (hi) bits, masked with 3, gives the 64 codes u of
// k = 0..63 resp. 64..127 of the block in order (one A-tile row). The shift
// is per 64-bit lane (vpsrlvq, 1 uop; gemm_avx512.inc says why that is exact).
struct Unpacker {
  m512i mask = _mm512_set1_epi8(3);
  m512i cnt01 = _mm512_inserti64x4(_mm512_set1_epi64(0), _mm256_set1_epi64x(2), 1);
  m512i cnt23 = _mm512_inserti64x4(_mm512_set1_epi64(4), _mm256_set1_epi64x(6), 1);
  // the 128 codes of the 32-byte block at p -> dst (k 0..63), dst + hi (64..127)
  void block(const uint8_t* p, uint8_t* dst, int64_t hi) const {
    const m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const m256i*)p));
    _mm512_store_si512(dst, _mm512_and_si512(_mm512_srlv_epi64(v, cnt01), mask));
    _mm512_store_si512(dst + hi, _mm512_and_si512(_mm512_srlv_epi64(v, cnt23), mask));
  }
};

// Unpacks packed block b (k = 128b .. 128b + 127) of rows [m0, m0 + nrows)
// (nrows <= 16) into 2 A tiles: dst (k step 2b) and dst + 1 KiB (step 2b + 1).
// Missing rows are zero.
static inline void unpack_block(const TernaryW& w, const ActQ& a, int m0, int nrows, int b, uint8_t* dst) {
  const int64_t wstride = a.Kp / 4;
  const Unpacker u;
  const uint8_t* row = w.data + (int64_t)m0 * wstride + b * 32;
  int r = 0;
  for (; r < nrows; ++r, row += wstride) u.block(row, dst + r * kTileK, kTileBytes);
  for (; r < kTileRows; ++r) {
    _mm512_store_si512(dst + r * kTileK, _mm512_setzero_si512());
    _mm512_store_si512(dst + kTileBytes + r * kTileK, _mm512_setzero_si512());
  }
}

// One 64-k step for one 32-row group: A tiles a0 (rows 0-15) and a1 (rows
// 16-31, only if nh == 2) x B tiles b0 / b1 (tokens 0-15 / 16-31, b1 only if
// two) into tmm0-3.
static inline void step_dpbusd(const uint8_t* a0, const uint8_t* a1, const int8_t* b0, const int8_t* b1, int nh,
                               bool two) {
  _tile_loadd(4, a0, kTileK);
  _tile_loadd(6, b0, kTileK);
  _tile_dpbusd(0, 4, 6);
  if (two) {
    _tile_loadd(7, b1, kTileK);
    _tile_dpbusd(1, 4, 7);
  }
  if (nh == 2) {
    _tile_loadd(5, a1, kTileK);
    _tile_dpbusd(2, 5, 6);
    if (two) _tile_dpbusd(3, 5, 7);
  }
}

// The two 64-k steps of block b: A tiles as unpack_block leaves them (cur:
// rows 0-15, steps 2b and 2b + 1; cur + 2 KiB: rows 16-31), B tiles of step s
// at bt0 / bt1 + s KiB.
static inline void block_dpbusd(const uint8_t* cur, const int8_t* bt0, const int8_t* bt1, int b, int nh, bool two) {
  for (int h = 0; h < 2; ++h) {
    const int64_t s = 2 * b + h;
    step_dpbusd(cur + h * kTileBytes, cur + (2 + h) * kTileBytes, bt0 + s * kTileBytes, bt1 + s * kTileBytes, nh,
                two);
  }
}

// C tile (16 weight rows x 16 tokens, row stride 64 B) -> outputs.
static void store_tile(const TernaryW& w, const ActQ& a, const int32_t* c, int m, int nrows, int n, int ncols,
                       int32_t* out) {
  for (int r = 0; r < nrows; ++r)
    for (int j = 0; j < ncols; ++j) ternary_out(w, a, m + r, n + j, c[r * kTileRows + j] - a.sum[n + j], out);
}

// tmm0-3 (group rows m.., r0 / r1 rows, tokens n.., nc0 / nc1 columns) -> outputs.
static inline void store_group(const TernaryW& w, const ActQ& a, int m, int r0, int r1, int nh, bool two, int n,
                               int nc0, int nc1, int32_t* c, int32_t* out) {
  _tile_stored(0, c, kTileK);
  store_tile(w, a, c, m, r0, n, nc0, out);
  if (two) {
    _tile_stored(1, c, kTileK);
    store_tile(w, a, c, m, r0, n + kTileRows, nc1, out);
  }
  if (nh == 2) {
    _tile_stored(2, c, kTileK);
    store_tile(w, a, c, m + kTileRows, r1, n, nc0, out);
    if (two) {
      _tile_stored(3, c, kTileK);
      store_tile(w, a, c, m + kTileRows, r1, n + kTileRows, nc1, out);
    }
  }
}

// "K-sliced B" job walker: rows [m0, m1) (<= kMaxGroups groups of 32) x tokens
// [n0, n1) (n0 a multiple of 16), per token tile pair over K in slices of
// kSliceBlocks blocks; within a slice every group reuses the same B tiles (32
// tokens x 512 k = 16 KiB, in L1 after the first group read them from L2), so
// B traffic from L2 drops by the number of groups. Each group's C tiles are
// parked in a stack buffer between slices (4 KiB stored + 4 KiB loaded per 32
// TDPBUSDs, from L1). blocks(m, r0, r1, nh, two, bt0, bt1, b0, b1) runs one
// group's blocks [b0, b1) into tmm0-3 (unpack + block_dpbusd).
constexpr int kSliceBlocks = 4;
constexpr int kMaxGroups = 4;  // 128 rows
template <class Blocks>
static inline void ternary_ks(const TernaryW& w, const ActQ& a, const int8_t* vb, int m0, int m1, int n0, int n1,
                              int32_t* out, const Blocks& blocks) {
  const int S = a.Kp / kTileK, nb = a.Kp / kKBlock;
  const int ng = (m1 - m0 + 2 * kTileRows - 1) / (2 * kTileRows);
  alignas(64) int32_t cp[kMaxGroups][4][kTileRows * kTileRows];  // parked C tiles
  alignas(64) int32_t c[kTileRows * kTileRows];
  for (int n = n0; n < n1; n += 2 * kTileRows) {
    const bool two = n + kTileRows < n1;
    const int8_t* bt0 = vb + (int64_t)(n / kTileRows) * S * kTileBytes;
    const int8_t* bt1 = bt0 + (int64_t)S * kTileBytes;
    const int nc0 = n1 - n < kTileRows ? n1 - n : kTileRows;
    const int nc1 = n1 - n - kTileRows < kTileRows ? n1 - n - kTileRows : kTileRows;
    for (int b0 = 0; b0 < nb; b0 += kSliceBlocks) {
      const int b1 = b0 + kSliceBlocks < nb ? b0 + kSliceBlocks : nb;
      const bool first = b0 == 0, last = b1 == nb;
      for (int g = 0; g < ng; ++g) {
        const int m = m0 + g * 2 * kTileRows;
        const int rows = m1 - m < 2 * kTileRows ? m1 - m : 2 * kTileRows;
        const int nh = rows > kTileRows ? 2 : 1;
        const int r0 = rows < kTileRows ? rows : kTileRows, r1 = rows - kTileRows;
        if (first) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, cp[g][0], kTileK);
          _tile_loadd(1, cp[g][1], kTileK);
          _tile_loadd(2, cp[g][2], kTileK);
          _tile_loadd(3, cp[g][3], kTileK);
        }
        blocks(m, r0, r1, nh, two, bt0, bt1, b0, b1);
        if (last) {
          store_group(w, a, m, r0, r1, nh, two, n, nc0, nc1, c, out);
        } else {
          _tile_stored(0, cp[g][0], kTileK);
          _tile_stored(1, cp[g][1], kTileK);
          _tile_stored(2, cp[g][2], kTileK);
          _tile_stored(3, cp[g][3], kTileK);
        }
      }
    }
  }
}
