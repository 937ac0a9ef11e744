// AMX-INT8 ternary GEMM (compiled with the AVX-512 VNNI flags plus
// -mamx-tile -mamx-int8; reached only through kAmxKernels after dispatch.cpp
// has checked cpuid and obtained Linux's permission for the tile state).
// Used for N >= amx_min_tokens() tokens; fewer tokens (decode) run the VNNI
// GEMV, which the dispatcher fills into this table's empty entries.
//
// Operands (docs/kernels.md has the pictures). TDPBUSD computes
//   C[i][j] += sum_k A[i][k] * B[k/4][4j + k%4],  A u8 (16 rows x 64 B), B s8
// with B in "VNNI" layout: B row r holds, for each of the 16 columns j, the 4
// consecutive k values 4r..4r+3. We put
//   A = unpacked ternary codes u = t+1 in {0,1,2} of 16 weight rows x 64 k:
//       exactly the row-major order the i2_b128 shift trick yields, no
//       transpose (one broadcast + shift + mask per 64 codes);
//   B = activations, re-laid out once per call into VNNI tiles (16 tokens x
//       64 k per 1 KiB tile) by act_vnni, in parallel before the jobs start;
//   C = 16 weight rows x 16 tokens, int32.
// TDPBUSD (u8 x s8) rather than TDPBSSD with t in {-1,0,1}: the u codes come
// out of the shift + mask directly (no subtract per 64 codes) and the +1
// offset is removed with the activation sum in the epilogue, exactly like the
// VNNI and AVX2 paths (dot(t, a) = dot(u, a) - sum(a); activations may be
// -128, which TDPBUSD handles as any s8). Padding k >= K: u = 1 against zero
// activations, so it adds nothing; tiles beyond the last weight row / token
// are zero and never stored.
//
// Register tiles: tmm0-3 = C for 2 weight-row tiles x 2 token tiles (32 x 32),
// tmm4-5 = A (weights), tmm6-7 = B (activations). Each A tile feeds 2
// TDPBUSDs, each B tile 2. A job (<= 32 rows, <= 64 tokens) unpacks its
// weight rows once into a per-thread buffer (32 rows x Kp bytes) and reuses it
// for every pair of token tiles.
// GCC 12 warns "__Y is used uninitialized" inside its own AVX-512 insert /
// broadcast intrinsics (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernels/epilogue.h"
#include "kernels/isa.h"
#include "kernels/simd512.h"
#ifdef BITDLM_SIMDE
// tests/simde: SIMDe for the AVX-512 part, a checking scalar emulator for the
// tiles (no CPU here runs AMX; the emulator faults where the hardware would)
#include "../tests/simde/amx_emu.h"
#endif

namespace bitdlm {
namespace amx {

constexpr int kTileK = 64;      // bytes (k values) per tile row
constexpr int kTileRows = 16;   // rows per tile
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

// Every tile the kernel uses is a full 16 x 64-byte tile (tails are zero
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

// Per-thread unpack buffer. Plain pointer + C allocation: no std:: container
// instantiated with AMX/AVX-512 flags (its inline symbols could be merged with
// baseline copies by the linker).
static thread_local uint8_t* t_buf = nullptr;
static thread_local size_t t_cap = 0;

static uint8_t* scratch(size_t bytes) {
  if (bytes > t_cap) {
    std::free(t_buf);
    t_buf = (uint8_t*)std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    t_cap = t_buf ? bytes : 0;
  }
  return t_buf;
}

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

// Unpacks rows [m0, m0 + nrows) (nrows <= 16) into A tiles: ub + s * 1 KiB,
// tile row r = the 64 codes u of k = 64s .. 64s + 63 of row m0 + r. Missing
// rows are zero.
static void unpack_rows(const TernaryW& w, const ActQ& a, int m0, int nrows, uint8_t* ub) {
  const int nb = a.Kp / kKBlock;
  const int64_t wstride = a.Kp / 4;
  const m512i mask = V(_mm512_set1_epi8)(3);
  // shift counts per 16-bit lane: low 256 bits by 0 resp. 4, high by 2 resp. 6,
  // so a broadcast 32-byte block yields k = 0..63 resp. 64..127 in order
  const m512i cnt01 = V(_mm512_inserti64x4)(V(_mm512_set1_epi16)(0), V(_mm256_set1_epi16)(2), 1);
  const m512i cnt23 = V(_mm512_inserti64x4)(V(_mm512_set1_epi16)(4), V(_mm256_set1_epi16)(6), 1);
  for (int r = 0; r < kTileRows; ++r) {
    uint8_t* dst = ub + r * kTileK;
    if (r >= nrows) {
      for (int s = 0; s < 2 * nb; ++s) V(_mm512_store_si512)(dst + s * kTileBytes, V(_mm512_setzero_si512)());
      continue;
    }
    const uint8_t* row = w.data + (int64_t)(m0 + r) * wstride;
    for (int b = 0; b < nb; ++b) {
      const m512i p = V(_mm512_broadcast_i64x4)(V(_mm256_loadu_si256)((const m256i*)(row + b * 32)));
      V(_mm512_store_si512)(dst + (2 * b) * kTileBytes, V(_mm512_and_si512)(V(_mm512_srlv_epi16)(p, cnt01), mask));
      V(_mm512_store_si512)(dst + (2 * b + 1) * kTileBytes, V(_mm512_and_si512)(V(_mm512_srlv_epi16)(p, cnt23), mask));
    }
  }
}

// C tile (16 weight rows x 16 tokens, row stride 64 B) -> outputs.
static void store_tile(const TernaryW& w, const ActQ& a, const int32_t* c, int m, int nrows, int n, int ncols,
                       int32_t* out) {
  for (int r = 0; r < nrows; ++r)
    for (int j = 0; j < ncols; ++j) ternary_out(w, a, m + r, n + j, c[r * kTileRows + j] - a.sum[n + j], out);
}

// Unpacks packed block b (k = 128b .. 128b + 127) of rows [m0, m0 + nrows)
// (nrows <= 16) into 2 A tiles: dst (k step 2b) and dst + 1 KiB (step 2b + 1).
static inline void unpack_block(const TernaryW& w, const ActQ& a, int m0, int nrows, int b, uint8_t* dst) {
  const int64_t wstride = a.Kp / 4;
  const m512i mask = V(_mm512_set1_epi8)(3);
  const m512i cnt01 = V(_mm512_inserti64x4)(V(_mm512_set1_epi16)(0), V(_mm256_set1_epi16)(2), 1);
  const m512i cnt23 = V(_mm512_inserti64x4)(V(_mm512_set1_epi16)(4), V(_mm256_set1_epi16)(6), 1);
  const uint8_t* row = w.data + (int64_t)m0 * wstride + b * 32;
  int r = 0;
  for (; r < nrows; ++r, row += wstride) {
    const m512i p = V(_mm512_broadcast_i64x4)(V(_mm256_loadu_si256)((const m256i*)row));
    V(_mm512_store_si512)(dst + r * kTileK, V(_mm512_and_si512)(V(_mm512_srlv_epi16)(p, cnt01), mask));
    V(_mm512_store_si512)(dst + kTileBytes + r * kTileK, V(_mm512_and_si512)(V(_mm512_srlv_epi16)(p, cnt23), mask));
  }
  for (; r < kTileRows; ++r) {
    V(_mm512_store_si512)(dst + r * kTileK, V(_mm512_setzero_si512)());
    V(_mm512_store_si512)(dst + kTileBytes + r * kTileK, V(_mm512_setzero_si512)());
  }
}

// How far ahead (in 128-k blocks) kAmxPrefetch fetches the job's weight rows:
// 8 blocks = 4 cache lines per row, ~1000 TDPBUSD cycles at N = 32, more than
// a DRAM miss. The job walks 32-128 rows in parallel (32 B of each per block),
// more concurrent streams than the L2 streamer follows well.
constexpr int kPfBlocks = 8;

// One 32-row group's 64-k steps of blocks [b0, b1) against the token tile pair
// (bt0, bt1 = B tiles of step 0; bt1 used only if two), accumulated into
// tmm0-3 (already zeroed or loaded). ub: 2 x 4 KiB of A tiles (the second half
// only with kAmxPipeline). r0 / r1: rows in the first / second 16-row tile
// (nh = 2 if the second exists).
//   kAmxPrefetch: prefetch each row kPfBlocks blocks ahead (every other block,
//     one cache line per row).
//   kAmxPipeline: double-buffered unpack, block b + 1 unpacked into the other
//     buffer after block b's TDPBUSDs are issued, so a tile load never reads
//     a store of the same iteration (the stores commit while the previous
//     block multiplies) and no store overwrites a buffer a pending tile load
//     still reads.
static inline void group_blocks(const TernaryW& w, const ActQ& a, int m, int r0, int r1, int nh, bool two,
                                const int8_t* bt0, const int8_t* bt1, int b0, int b1, uint8_t* ub, int var) {
  const int nb = a.Kp / kKBlock;
  const int64_t wstride = a.Kp / 4;
  const bool pipe = var & kAmxPipeline, pf = var & kAmxPrefetch;
  const int rows = nh == 2 ? kTileRows + r1 : r0;
  auto unpack = [&](int b, uint8_t* dst) {
    if (pf && !(b & 1) && b + kPfBlocks < nb) {
      const uint8_t* p = w.data + (int64_t)m * wstride + (b + kPfBlocks) * 32;
      for (int r = 0; r < rows; ++r) PREFETCH(p + r * wstride);
    }
    unpack_block(w, a, m, r0, b, dst);
    if (nh == 2) unpack_block(w, a, m + kTileRows, r1, b, dst + 2 * kTileBytes);
  };
  if (pipe) unpack(b0, ub);
  for (int b = b0; b < b1; ++b) {
    uint8_t* cur = pipe ? ub + ((b - b0) & 1) * 4 * kTileBytes : ub;
    if (!pipe) unpack(b, cur);
    for (int h = 0; h < 2; ++h) {
      const int s = 2 * b + h;
      _tile_loadd(4, cur + h * kTileBytes, kTileK);
      _tile_loadd(6, bt0 + s * kTileBytes, kTileK);
      _tile_dpbusd(0, 4, 6);
      if (two) {
        _tile_loadd(7, bt1 + s * kTileBytes, kTileK);
        _tile_dpbusd(1, 4, 7);
      }
      if (nh == 2) {
        _tile_loadd(5, cur + (2 + h) * kTileBytes, kTileK);
        _tile_dpbusd(2, 5, 6);
        if (two) _tile_dpbusd(3, 5, 7);
      }
    }
    if (pipe && b + 1 < b1) unpack(b + 1, ub + ((b + 1 - b0) & 1) * 4 * kTileBytes);
  }
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

// Variant bit 0 ("L1 unpack"): the weight rows are unpacked one 128-k block
// (4 A tiles = 4 KiB) at a time, right before the TDPBUSDs that use them, so A
// tiles load from L1 instead of from a 32 x Kp buffer (80 KiB at K = 2560)
// that lives in L2; the unpack also overlaps the tile multiplies instead of
// running as a separate phase. The block is reused by both token tiles of a
// pair; a job of > 32 tokens unpacks once per token pair (dispatch's variant
// bit 2 keeps jobs at 32 tokens for that reason).
static void ternary_tiles_l1(const TernaryW& w, const ActQ& a, const int8_t* vb, int m0, int m1, int n0, int n1,
                             int32_t* out) {
  const int S = a.Kp / kTileK, nb = a.Kp / kKBlock;
  const int rows = m1 - m0;
  const int nh = rows > kTileRows ? 2 : 1;
  const int r0 = rows < kTileRows ? rows : kTileRows, r1 = rows - kTileRows;
  const int var = amx_variant();
  alignas(64) uint8_t ub[8 * kTileBytes];  // [buffer][half][step of the block]
  alignas(64) int32_t c[kTileRows * kTileRows];
  for (int n = n0; n < n1; n += 2 * kTileRows) {
    const bool two = n + kTileRows < n1;
    const int8_t* bt0 = vb + (int64_t)(n / kTileRows) * S * kTileBytes;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    group_blocks(w, a, m0, r0, r1, nh, two, bt0, bt0 + (int64_t)S * kTileBytes, 0, nb, ub, var);
    const int nc0 = n1 - n < kTileRows ? n1 - n : kTileRows;
    const int nc1 = n1 - n - kTileRows < kTileRows ? n1 - n - kTileRows : kTileRows;
    store_group(w, a, m0, r0, r1, nh, two, n, nc0, nc1, c, out);
  }
}

// Variant bits 5 / 6 (kAmxRows64 / kAmxRows128: jobs of 64 / 128 rows),
// "K-sliced B": the job's 2-4 groups of 32 rows run over K in slices of
// kSliceBlocks blocks; within a slice every group reuses the same B tiles
// (32 tokens x 512 k = 16 KiB, in L1 after the first group read them from
// L2), so B traffic from L2 drops by the number of groups. The C tiles of
// each group are parked in a 16 KiB stack buffer between slices (4 KiB
// stored + 4 KiB loaded per 32 TDPBUSDs, from L1). The A unpack is as in
// bit 0 (one block at a time; kAmxPipeline / kAmxPrefetch apply).
constexpr int kSliceBlocks = 4;
constexpr int kMaxGroups = 4;  // 128 rows
static void ternary_tiles_ks(const TernaryW& w, const ActQ& a, const int8_t* vb, int m0, int m1, int n0, int n1,
                             int32_t* out) {
  const int S = a.Kp / kTileK, nb = a.Kp / kKBlock;
  const int ng = (m1 - m0 + 2 * kTileRows - 1) / (2 * kTileRows);
  const int var = amx_variant();
  alignas(64) uint8_t ub[8 * kTileBytes];
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
        group_blocks(w, a, m, r0, r1, nh, two, bt0, bt1, b0, b1, ub, var);
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

// Rows [m0, m1) (<= amx_row_block(variant): 32, 64 or 128) x tokens [n0, n1)
// (n0 a multiple of 16, <= 64 tokens). vb: the call's act_vnni tiles.
// Requires tile_begin() in this thread.
static void ternary_tiles(const TernaryW& w, const ActQ& a, const int8_t* vb, int m0, int m1, int n0, int n1,
                          int32_t* out) {
  const int var = amx_variant();
  if (var & (kAmxRows64 | kAmxRows128)) return ternary_tiles_ks(w, a, vb, m0, m1, n0, n1, out);
  if (var & kAmxL1Unpack) return ternary_tiles_l1(w, a, vb, m0, m1, n0, n1, out);
  const int S = a.Kp / kTileK;
  const int rows = m1 - m0;
  const int nh = rows > kTileRows ? 2 : 1;
  uint8_t* ub = scratch((size_t)2 * S * kTileBytes);
  if (!ub) throw std::bad_alloc();
  unpack_rows(w, a, m0, rows < kTileRows ? rows : kTileRows, ub);
  if (nh == 2) unpack_rows(w, a, m0 + kTileRows, rows - kTileRows, ub + (size_t)S * kTileBytes);
  const uint8_t* ub1 = ub + (size_t)S * kTileBytes;
  alignas(64) int32_t c[kTileRows * kTileRows];
  for (int n = n0; n < n1; n += 2 * kTileRows) {
    const bool two = n + kTileRows < n1;
    const int8_t* b0 = vb + (int64_t)(n / kTileRows) * S * kTileBytes;
    const int8_t* b1 = b0 + (int64_t)S * kTileBytes;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int s = 0; s < S; ++s) {
      _tile_loadd(4, ub + s * kTileBytes, kTileK);
      _tile_loadd(6, b0 + s * kTileBytes, kTileK);
      _tile_dpbusd(0, 4, 6);
      if (two) {
        _tile_loadd(7, b1 + s * kTileBytes, kTileK);
        _tile_dpbusd(1, 4, 7);
      }
      if (nh == 2) {
        _tile_loadd(5, ub1 + s * kTileBytes, kTileK);
        _tile_dpbusd(2, 5, 6);
        if (two) _tile_dpbusd(3, 5, 7);
      }
    }
    const int nc0 = n1 - n < kTileRows ? n1 - n : kTileRows;
    const int nc1 = n1 - n - kTileRows < kTileRows ? n1 - n - kTileRows : kTileRows;
    const int r0 = rows < kTileRows ? rows : kTileRows, r1 = rows - kTileRows;
    _tile_stored(0, c, kTileK);
    store_tile(w, a, c, m0, r0, n, nc0, out);
    if (two) {
      _tile_stored(1, c, kTileK);
      store_tile(w, a, c, m0, r0, n + kTileRows, nc1, out);
    }
    if (nh == 2) {
      _tile_stored(2, c, kTileK);
      store_tile(w, a, c, m0 + kTileRows, r1, n, nc0, out);
      if (two) {
        _tile_stored(3, c, kTileK);
        store_tile(w, a, c, m0 + kTileRows, r1, n + kTileRows, nc1, out);
      }
    }
  }
}

// int8 lm_head (TDPBSSD, s8 x s8): the weights [V, K] are A tiles loaded
// straight from the matrix (16 rows x 64 k, row stride K: no unpack, no copy),
// the activations B tiles from act_vnni (as the ternary GEMM's). Per 64-k
// step 2 A + 2 B tile loads feed 4 TDPBSSDs (32 rows x 32 tokens). The matrix
// is streamed once for N <= 32 (for more tokens the job's 32 rows, 80 KiB at
// K = 2560, come back from L2). Codes in [-127, 127] (either sign is fine for
// s8 x s8); the int32 dot and i8_out are those of every other ISA, so the
// logits are bit-identical.
// Prefetch: a group walks 32 rows in parallel, more streams than the L2
// streamer follows, and a core's own demand misses are capped by its L1 fill
// buffers (~16 x 64 B per ~300 ns = ~3.4 GB/s, about what the VNNI lm_head
// reached: 49 GB/s on 12 cores). So by default, while a group multiplies, the
// next group of the job (32 x K contiguous bytes) is prefetched into L2
// (prefetcht1), paced over the group's steps (the AVX2 lm_head driver's
// scheme); the job's first group is left to the hardware. kAmxPrefetch
// instead prefetches each row of the current group 4 steps (256 B) ahead.

static void i8_tiles(const int8_t* W, const float* wscale, int K, const ActQ& a, const int8_t* vb, float* y,
                     int ldy, int m0, int m1) {
  const int S = a.Kp / kTileK, Sk = K / kTileK;
  const int G = (a.N + kTileRows - 1) / kTileRows;
  const bool pf = amx_variant() & kAmxPrefetch;
  constexpr int kPfSteps = 4;
  const int64_t gbytes = (int64_t)2 * kTileRows * K;
  alignas(64) int32_t c[kTileRows * kTileRows];
  auto out = [&](int m, int n, int nc) {
    for (int r = 0; r < kTileRows; ++r)
      for (int j = 0; j < nc; ++j) i8_out(wscale, a, y, ldy, m + r, n + j, c[r * kTileRows + j]);
  };
  for (int m = m0; m < m1; m += 2 * kTileRows) {
    const bool rows2 = m + kTileRows < m1;
    const int8_t* a0 = W + (int64_t)m * K;
    const int8_t* a1 = a0 + (int64_t)kTileRows * K;
    // the job's next group: [m + 32, min(m + 64, m1)) rows, contiguous
    const int next_rows = m1 - m - 2 * kTileRows < 2 * kTileRows ? m1 - m - 2 * kTileRows : 2 * kTileRows;
    const char* pnext = (const char*)(a0 + gbytes);
    const int64_t nbytes = !pf && next_rows > 0 ? (int64_t)next_rows * K : 0;
    int64_t done = 0;
    for (int g = 0; g < G; g += 2) {
      const bool two = g + 1 < G;
      const int8_t* bt0 = vb + (int64_t)g * S * kTileBytes;
      const int8_t* bt1 = bt0 + (int64_t)S * kTileBytes;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int s = 0; s < Sk; ++s) {
        if (pf && g == 0 && s + kPfSteps < Sk)
          for (int r = 0; r < (rows2 ? 2 : 1) * kTileRows; ++r) PREFETCH(a0 + (int64_t)r * K + (s + kPfSteps) * kTileK);
        if (g == 0)
          for (const int64_t target = nbytes * (s + 1) / Sk; done < target; done += 64)
            __builtin_prefetch(pnext + done, 0, 2);  // prefetcht1
        _tile_loadd(4, a0 + s * kTileK, K);
        _tile_loadd(6, bt0 + s * kTileBytes, kTileK);
        _tile_dpbssd(0, 4, 6);
        if (two) {
          _tile_loadd(7, bt1 + s * kTileBytes, kTileK);
          _tile_dpbssd(1, 4, 7);
        }
        if (rows2) {
          _tile_loadd(5, a1 + s * kTileK, K);
          _tile_dpbssd(2, 5, 6);
          if (two) _tile_dpbssd(3, 5, 7);
        }
      }
      const int n = g * kTileRows;
      const int nc0 = a.N - n < kTileRows ? a.N - n : kTileRows;
      const int nc1 = a.N - n - kTileRows < kTileRows ? a.N - n - kTileRows : kTileRows;
      _tile_stored(0, c, kTileK);
      out(m, n, nc0);
      if (two) {
        _tile_stored(1, c, kTileK);
        out(m, n + kTileRows, nc1);
      }
      if (rows2) {
        _tile_stored(2, c, kTileK);
        out(m + kTileRows, n, nc0);
        if (two) {
          _tile_stored(3, c, kTileK);
          out(m + kTileRows, n + kTileRows, nc1);
        }
      }
    }
  }
}

}  // namespace amx

// isa.h; set by dispatch.cpp (BITDLM_AMX_VARIANT / set_amx_variant). Constant
// initialized: no load-time code in this AMX-flagged file.
int g_amx_variant = kAmxDefaultVariant;

// Only the AMX entries; ternary / f16 / i8 / quantize are nullptr and filled
// from the AVX-512 VNNI table when the dispatcher picks this ISA.
// (Constant-initialized: no load-time code runs from this AMX-flagged file.)
extern const KernelTable kAmxKernels = {nullptr, nullptr, nullptr, nullptr, &amx::act_vnni, &amx::ternary_tiles,
                                        &amx::tile_begin, &amx::tile_end, &amx::i8_tiles};

}  // namespace bitdlm
