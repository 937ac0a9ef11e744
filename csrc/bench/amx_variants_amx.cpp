// Bench-only AMX ternary kernel variants (BITDLM_BENCH_KERNELS builds; never
// shipped): the alternatives the Sapphire Rapids sweeps measured against the
// shipped kernel (gemm_amx.cpp = variant 49 since session 6; 33 before), kept so bench/amx_sweep.py can
// re-measure them. Bit flags (docs/kernels.md has the predictions and results):
//   1  kAmxL1Unpack: unpack one 128-k block at a time into L1 (else the job's
//                 rows once into a per-thread buffer of 32 x Kp bytes)
//   8  kAmxPrefetch: software prefetch of the job's weight rows 8 blocks ahead
//   16 kAmxPipeline: double-buffered unpack, one block ahead of the TDPBUSDs
//   32 kAmxRows64 / 64 kAmxRows128: 64- / 128-row jobs with K-sliced B panels
//   128 kAmxStream (session 12, unmeasured on AMX hardware): one unpack
//                 pipeline over the job's whole item sequence (ternary_ks's
//                 order: token tile pair, K slice, 32-row group, block; same
//                 C-tile park / restore), the item D ahead unpacked right after
//                 an item's TDPBUSDs are issued, across slice and group
//                 boundaries, into a ring of D + 1 4-KiB A buffers; D = 2. It
//                 replaces bits 1 and 16 (sweep it as 177 = 128 | 49); 8 and
//                 32 / 64 keep their meaning (without 32 / 64: 32-row jobs).
//                 Why: the shipped walker restarts its one-block-ahead pipeline
//                 per (pair, slice, group), so every 4 blocks a block's tile
//                 loads follow its own unpack stores directly (a suspected
//                 TILELOADD-after-store stall).
//   256 kAmxDeep: stream depth D = 3 (ring of 4); only with 128 (set_amx_variant
//                 refuses it alone): 433 = 256 | 128 | 49.
// _core.set_amx_variant (bind_bench.cpp) installs variant_tiles in the
// dispatcher (set_amx_ternary_kernel); every variant is bit-exact
// (tests/simde/harness.cpp, tests/test_kernels.py natively).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernels/epilogue.h"
#include "bench/amx_variants.h"
#include "kernels/isa.h"
#include "kernels/simd512.h"

namespace bitdlm {
// bind_bench.cpp sets it (validated there); constant-initialized: the shipped kernel
int g_amx_bench_variant = kAmxShipped;

namespace amx_bench {

#include "kernels/amx_tiles.h"

// Per-thread unpack buffer of variant 0. Plain pointer + C allocation: no std::
// container instantiated with AMX/AVX-512 flags.
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

// Unpacks rows [m0, m0 + nrows) (nrows <= 16) into A tiles: ub + s * 1 KiB,
// tile row r = the 64 codes u of k = 64s .. 64s + 63 of row m0 + r. Missing
// rows are zero.
static void unpack_rows(const TernaryW& w, const ActQ& a, int m0, int nrows, uint8_t* ub) {
  const int nb = a.Kp / kKBlock;
  const int64_t wstride = a.Kp / 4;
  const Unpacker u;
  for (int r = 0; r < kTileRows; ++r) {
    uint8_t* dst = ub + r * kTileK;
    if (r >= nrows) {
      for (int s = 0; s < 2 * nb; ++s) _mm512_store_si512(dst + s * kTileBytes, _mm512_setzero_si512());
      continue;
    }
    const uint8_t* row = w.data + (int64_t)(m0 + r) * wstride;
    for (int b = 0; b < nb; ++b) u.block(row + b * 32, dst + (2 * b) * kTileBytes, kTileBytes);
  }
}

// How far ahead (in 128-k blocks) kAmxPrefetch fetches the job's weight rows:
// 8 blocks = 4 cache lines per row, ~1000 TDPBUSD cycles at N = 32.
constexpr int kPfBlocks = 8;

// Block b of the 32-row group at row m (r0 / r1 rows in its 16-row halves, nh
// halves) -> 4 A tiles at dst (as block_dpbusd reads them); with pf first the
// software prefetch of the group's rows kPfBlocks blocks ahead (every other
// block).
static inline void unpack_group(const TernaryW& w, const ActQ& a, int m, int r0, int r1, int nh, int b, uint8_t* dst,
                                bool pf) {
  const int nb = a.Kp / kKBlock;
  const int64_t wstride = a.Kp / 4;
  if (pf && !(b & 1) && b + kPfBlocks < nb) {
    const int rows = nh == 2 ? kTileRows + r1 : r0;
    const uint8_t* p = w.data + (int64_t)m * wstride + (b + kPfBlocks) * 32;
    for (int r = 0; r < rows; ++r) PREFETCH(p + r * wstride);
  }
  unpack_block(w, a, m, r0, b, dst);
  if (nh == 2) unpack_block(w, a, m + kTileRows, r1, b, dst + 2 * kTileBytes);
}

// One 32-row group's blocks [b0, b1) into tmm0-3 with the kAmxPrefetch /
// kAmxPipeline options. ub: 2 x 4 KiB of A tiles (the second half only with
// kAmxPipeline: block b + 1 is unpacked into the other buffer after block b's
// TDPBUSDs are issued, so a tile load never reads a store of the same
// iteration).
static inline void group_blocks(const TernaryW& w, const ActQ& a, int m, int r0, int r1, int nh, bool two,
                                const int8_t* bt0, const int8_t* bt1, int b0, int b1, uint8_t* ub, int var) {
  const bool pipe = var & kAmxPipeline, pf = var & kAmxPrefetch;
  auto unpack = [&](int b, uint8_t* dst) { unpack_group(w, a, m, r0, r1, nh, b, dst, pf); };
  if (pipe) unpack(b0, ub);
  for (int b = b0; b < b1; ++b) {
    uint8_t* cur = pipe ? ub + ((b - b0) & 1) * 4 * kTileBytes : ub;
    if (!pipe) unpack(b, cur);
    block_dpbusd(cur, bt0, bt1, b, nh, two);
    if (pipe && b + 1 < b1) unpack(b + 1, ub + ((b + 1 - b0) & 1) * 4 * kTileBytes);
  }
}

// Row split of a <= 32-row job: r0 / r1 rows in its two 16-row tiles.
struct Rows {
  int nh, r0, r1;
  explicit Rows(int rows)
      : nh(rows > kTileRows ? 2 : 1), r0(rows < kTileRows ? rows : kTileRows), r1(rows - kTileRows) {}
};

// kAmxStream: the (group, block) items of one token tile pair in ternary_ks's
// order (per K slice of kSliceBlocks blocks, per group, per block of the
// slice), starting over for the next pair (the unpack does not depend on the
// tokens).
struct Walk {
  int nb, ng, b0 = 0, g = 0, b = 0;
  Walk(int nblocks, int ngroups) : nb(nblocks), ng(ngroups) {}
  void next() {
    const int b1 = b0 + kSliceBlocks < nb ? b0 + kSliceBlocks : nb;
    if (++b < b1) return;
    if (++g < ng) {
      b = b0;
      return;
    }
    g = 0;
    b0 = b1 < nb ? b1 : 0;
    b = b0;
  }
};

constexpr int kStreamDepth = 2, kDeepStreamDepth = 3;

// kAmxStream over ternary_ks (same walk, same C park / restore): `depth` items
// are unpacked ahead into a ring of depth + 1 slots of 4 KiB; after item i's
// TDPBUSDs are issued, item i + depth goes into the slot item i - 1 used (its
// tile loads were issued an item ago), whatever slice / group / pair it
// belongs to, so a tile load reads stores made `depth` items earlier.
static void stream_tiles(const TernaryW& w, const ActQ& a, const int8_t* vb, int m0, int m1, int n0, int n1,
                         int32_t* out, int var) {
  const int nb = a.Kp / kKBlock;
  const int ng = (m1 - m0 + 2 * kTileRows - 1) / (2 * kTileRows);
  const int depth = (var & kAmxDeep) ? kDeepStreamDepth : kStreamDepth, slots = depth + 1;
  const bool pf = var & kAmxPrefetch;
  alignas(64) uint8_t ring[(kDeepStreamDepth + 1) * 4 * kTileBytes];
  Walk ahead(nb, ng);
  // items not unpacked yet: token tile pairs x groups x blocks
  int64_t todo = (int64_t)((n1 - n0 + 2 * kTileRows - 1) / (2 * kTileRows)) * ng * nb;
  int put = 0, get = 0;  // ring slots: the next to unpack into, the next to multiply
  auto unpack_next = [&]() {
    const int m = m0 + ahead.g * 2 * kTileRows;
    const Rows rw(m1 - m < 2 * kTileRows ? m1 - m : 2 * kTileRows);
    unpack_group(w, a, m, rw.r0, rw.r1, rw.nh, ahead.b, ring + put * 4 * kTileBytes, pf);
    put = put + 1 < slots ? put + 1 : 0;
    ahead.next();
    --todo;
  };
  for (int i = 0; i < depth && todo > 0; ++i) unpack_next();
  ternary_ks(w, a, vb, m0, m1, n0, n1, out,
             [&](int, int, int, int nh, bool two, const int8_t* bt0, const int8_t* bt1, int b0, int b1) {
               for (int b = b0; b < b1; ++b) {
                 block_dpbusd(ring + get * 4 * kTileBytes, bt0, bt1, b, nh, two);
                 get = get + 1 < slots ? get + 1 : 0;
                 if (todo > 0) unpack_next();
               }
             });
}

// The variant's kernel for rows [m0, m1) (32, 64 or 128 rows) x tokens [n0, n1).
static void variant_tiles(const TernaryW& w, const ActQ& a, const int8_t* vb, int m0, int m1, int n0, int n1,
                          int32_t* out) {
  const int var = g_amx_bench_variant;
  if (var & kAmxStream) {
    stream_tiles(w, a, vb, m0, m1, n0, n1, out, var);
    return;
  }
  const int S = a.Kp / kTileK, nb = a.Kp / kKBlock;
  alignas(64) uint8_t ub[8 * kTileBytes];
  alignas(64) int32_t c[kTileRows * kTileRows];
  if (var & (kAmxRows64 | kAmxRows128)) {
    ternary_ks(w, a, vb, m0, m1, n0, n1, out,
               [&](int m, int r0, int r1, int nh, bool two, const int8_t* bt0, const int8_t* bt1, int b0, int b1) {
                 group_blocks(w, a, m, r0, r1, nh, two, bt0, bt1, b0, b1, ub, var);
               });
    return;
  }
  const Rows rw(m1 - m0);
  // variant 0: the job's rows unpacked once into a 32 x Kp buffer (L2)
  uint8_t* rb = nullptr;
  if (!(var & kAmxL1Unpack)) {
    rb = scratch((size_t)2 * S * kTileBytes);
    if (!rb) throw std::bad_alloc();
    unpack_rows(w, a, m0, rw.r0, rb);
    if (rw.nh == 2) unpack_rows(w, a, m0 + kTileRows, rw.r1, rb + (size_t)S * kTileBytes);
  }
  for (int n = n0; n < n1; n += 2 * kTileRows) {
    const bool two = n + kTileRows < n1;
    const int8_t* bt0 = vb + (int64_t)(n / kTileRows) * S * kTileBytes;
    const int8_t* bt1 = bt0 + (int64_t)S * kTileBytes;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if (var & kAmxL1Unpack) {
      group_blocks(w, a, m0, rw.r0, rw.r1, rw.nh, two, bt0, bt1, 0, nb, ub, var);
    } else {
      // A tiles of step s: rb + s KiB (rows 0-15), rb + (S + s) KiB (16-31)
      for (int s = 0; s < S; ++s)
        step_dpbusd(rb + s * kTileBytes, rb + (S + s) * kTileBytes, bt0 + s * kTileBytes, bt1 + s * kTileBytes,
                    rw.nh, two);
    }
    const int nc0 = n1 - n < kTileRows ? n1 - n : kTileRows;
    const int nc1 = n1 - n - kTileRows < kTileRows ? n1 - n - kTileRows : kTileRows;
    store_group(w, a, m0, rw.r0, rw.r1, rw.nh, two, n, nc0, nc1, c, out);
  }
}

}  // namespace amx_bench

// bind_bench.cpp (baseline) installs it with set_amx_ternary_kernel.
extern const AmxTernaryFn kAmxVariantTiles = &amx_bench::variant_tiles;

}  // namespace bitdlm
