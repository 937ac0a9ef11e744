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
  alignas(64) uint8_t ub[4 * kTileBytes];  // [half][step of the block]
  alignas(64) int32_t c[kTileRows * kTileRows];
  for (int n = n0; n < n1; n += 2 * kTileRows) {
    const bool two = n + kTileRows < n1;
    const int8_t* b0 = vb + (int64_t)(n / kTileRows) * S * kTileBytes;
    const int8_t* b1 = b0 + (int64_t)S * kTileBytes;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int b = 0; b < nb; ++b) {
      unpack_block(w, a, m0, r0, b, ub);
      if (nh == 2) unpack_block(w, a, m0 + kTileRows, r1, b, ub + 2 * kTileBytes);
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * b + h;
        _tile_loadd(4, ub + h * kTileBytes, kTileK);
        _tile_loadd(6, b0 + s * kTileBytes, kTileK);
        _tile_dpbusd(0, 4, 6);
        if (two) {
          _tile_loadd(7, b1 + s * kTileBytes, kTileK);
          _tile_dpbusd(1, 4, 7);
        }
        if (nh == 2) {
          _tile_loadd(5, ub + (2 + h) * kTileBytes, kTileK);
          _tile_dpbusd(2, 5, 6);
          if (two) _tile_dpbusd(3, 5, 7);
        }
      }
    }
    const int nc0 = n1 - n < kTileRows ? n1 - n : kTileRows;
    const int nc1 = n1 - n - kTileRows < kTileRows ? n1 - n - kTileRows : kTileRows;
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

// Rows [m0, m1) (<= 32) x tokens [n0, n1) (n0 a multiple of 16, <= 64 tokens).
// vb: the call's act_vnni tiles. Requires tile_begin() in this thread.
static void ternary_tiles(const TernaryW& w, const ActQ& a, const int8_t* vb, int m0, int m1, int n0, int n1,
                          int32_t* out) {
  if (amx_variant() & kAmxL1Unpack) return ternary_tiles_l1(w, a, vb, m0, m1, n0, n1, out);
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

}  // namespace amx

int g_amx_variant;  // isa.h; set by dispatch.cpp (BITDLM_AMX_VARIANT / set_amx_variant)

// Only the AMX entries; ternary / f16 / i8 / quantize are nullptr and filled
// from the AVX-512 VNNI table when the dispatcher picks this ISA.
// (Constant-initialized: no load-time code runs from this AMX-flagged file.)
extern const KernelTable kAmxKernels = {"amx",          nullptr,          nullptr,          nullptr,
                                        nullptr,        &amx::act_vnni,   &amx::ternary_tiles, &amx::tile_begin,
                                        &amx::tile_end};

}  // namespace bitdlm
