// AMX-INT8 ternary GEMM and int8 lm_head (compiled with the AVX-512 VNNI
// flags plus -mamx-tile -mamx-int8; reached only through kAmxKernels after
// dispatch.cpp has checked cpuid and obtained Linux's permission for the tile
// state). The ternary GEMM runs here for N >= amx_min_tokens() tokens, fewer
// (decode) on the VNNI GEMV, which the dispatcher fills into this table's
// empty entries; the int8 lm_head runs here from kAmxLmHeadMinTokens tokens.
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
// TDPBUSDs, each B tile 2. A job is kAmxRowBlock (64) rows = 2 groups of 32
// sharing K-sliced B panels (amx_tiles.h ternary_ks); each group unpacks one
// 128-k block (4 A tiles, 4 KiB, L1) right before its TDPBUSDs. This is the
// fastest of the variants measured on the Sapphire Rapids machine (the others
// live in csrc/bench/, built only for bench/ with BITDLM_BENCH_KERNELS).
// GCC 12 warns "__Y is used uninitialized" inside its own AVX-512 insert /
// broadcast intrinsics (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cstdlib>
#include <cstring>

#include "kernels/epilogue.h"
#include "kernels/isa.h"
#include "kernels/simd512.h"
// (tests/simde/harness.cpp builds this file against SIMDe and injects its
// tile emulator with -include tests/simde/amx_emu.h: no product include.)

namespace bitdlm {
namespace amx {

#include "kernels/amx_tiles.h"

// Rows [m0, m1) (<= kAmxRowBlock) x tokens [n0, n1) (n0 a multiple of 16,
// <= 64 tokens). vb: the call's act_vnni tiles. Requires tile_begin() in this
// thread.
static void ternary_tiles(const TernaryW& w, const ActQ& a, const int8_t* vb, int m0, int m1, int n0, int n1,
                          int32_t* out) {
  // Two blocks of A tiles ([16-row half][step of the block] each): block b + 1
  // is unpacked after block b's TDPBUSDs are issued, into the other buffer, so
  // no tile load reads a store of its own iteration (the bench variant 49,
  // shipped since session 6: 30-layer pass at N = 32 14.2 vs 16.5 ms, N = 8 8.9
  // vs 9.3 on Sapphire Rapids; docs/kernels.md).
  alignas(64) uint8_t ub[8 * kTileBytes];
  ternary_ks(w, a, vb, m0, m1, n0, n1, out,
             [&](int m, int r0, int r1, int nh, bool two, const int8_t* bt0, const int8_t* bt1, int b0, int b1) {
               auto unpack = [&](int b) {
                 uint8_t* dst = ub + ((b - b0) & 1) * 4 * kTileBytes;
                 unpack_block(w, a, m, r0, b, dst);
                 if (nh == 2) unpack_block(w, a, m + kTileRows, r1, b, dst + 2 * kTileBytes);
               };
               if (b0 < b1) unpack(b0);
               for (int b = b0; b < b1; ++b) {
                 block_dpbusd(ub + ((b - b0) & 1) * 4 * kTileBytes, bt0, bt1, b, nh, two);
                 if (b + 1 < b1) unpack(b + 1);
               }
             });
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
// scheme); the job's first group is left to the hardware. That is for N > 16;
// with one token tile (N <= 16, the block step's 8 output rows) each row of
// the current group is prefetched 4 steps (256 B) ahead instead: measured on
// the Sapphire Rapids machine (16 threads, 128256 x 2560, docs/kernels.md)
// 1.32 ms vs 1.65 at N = 8, but 4.18 vs 1.99 at N = 32.

static void i8_tiles(const int8_t* W, const float* wscale, int K, const ActQ& a, const int8_t* vb, float* y,
                     int ldy, int m0, int m1) {
  const int S = a.Kp / kTileK, Sk = K / kTileK;
  const int G = (a.N + kTileRows - 1) / kTileRows;
  const bool pf = a.N <= kTileRows;
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

// Only the AMX entries; ternary / f16 / i8 / quantize are nullptr and filled
// from the AVX-512 VNNI table when the dispatcher picks this ISA.
// (Constant-initialized: no load-time code runs from this AMX-flagged file.)
extern const KernelTable kAmxKernels = {nullptr, nullptr, nullptr, nullptr, &amx::act_vnni, &amx::ternary_tiles,
                                        &amx::tile_begin, &amx::tile_end, &amx::i8_tiles};

}  // namespace bitdlm
