// Scalar emulation of the AMX tile intrinsics gemm_amx.cpp uses, for the SIMDe
// harness (-DBITDLM_SIMDE) on CPUs without AMX. It follows the Intel
// pseudocode (LDTILECFG layout, TILELOADD/TILESTORED rows x colsb, TDPBUSD:
// C.row[m].dword[n] += sum_k u8(A.row[m].byte[4k+i]) * s8(B.row[k].byte[4n+i]),
// TDPBSSD the same with s8(A...))
// and checks what the hardware would fault on: an unconfigured tile, shapes
// that do not chain (A.colsb == 4 * B.rows, B.colsb == C.colsb, A.rows ==
// C.rows), more than 16 rows or 64 bytes per row, palette != 1.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace amx_emu {
struct Tile {
  int rows = 0, colsb = 0;
  uint8_t d[16][64];
};
// inline (C++17): one tile state per thread shared by every translation unit
// the harness injects this header into (-include), as the hardware has one
inline thread_local Tile g_t[8];
inline thread_local bool g_cfg = false;
static inline void fail(const char* what) {
  std::printf("AMX-EMU FAULT: %s\n", what);
  std::fflush(stdout);
  std::abort();
}
static inline Tile& tile(int i) {
  if (!g_cfg) fail("tile used without LDTILECFG");
  if (i < 0 || i > 7 || g_t[i].rows == 0) fail("unconfigured tile");
  return g_t[i];
}
static inline void loadconfig(const void* p) {
  const uint8_t* c = (const uint8_t*)p;
  if (c[0] != 1) fail("palette_id != 1");
  for (int i = 2; i < 16; ++i)
    if (c[i]) fail("reserved bytes not zero");
  for (int i = 0; i < 8; ++i) {
    const int colsb = c[16 + 2 * i] | (c[17 + 2 * i] << 8), rows = c[48 + i];
    if (colsb > 64 || rows > 16 || (colsb == 0) != (rows == 0)) fail("tile shape out of range");
    g_t[i].colsb = colsb;
    g_t[i].rows = rows;
  }
  g_cfg = true;
}
static inline void release() { g_cfg = false; }
static inline void zero(int i) { std::memset(tile(i).d, 0, sizeof tile(i).d); }
static inline void loadd(int i, const void* base, long stride) {
  Tile& t = tile(i);
  std::memset(t.d, 0, sizeof t.d);
  for (int r = 0; r < t.rows; ++r) std::memcpy(t.d[r], (const uint8_t*)base + r * stride, t.colsb);
}
static inline void stored(int i, void* base, long stride) {
  Tile& t = tile(i);
  for (int r = 0; r < t.rows; ++r) std::memcpy((uint8_t*)base + r * stride, t.d[r], t.colsb);
}
// TDPBUSD (A unsigned) and TDPBSSD (A signed); B is signed in both.
template <bool kSignedA>
static inline void dpb(int c, int a, int b) {
  Tile &C = tile(c), &A = tile(a), &B = tile(b);
  if (A.colsb != 4 * B.rows || B.colsb != C.colsb || A.rows != C.rows || c == a || c == b || a == b)
    fail("TDPBUSD / TDPBSSD shapes do not chain");
  for (int m = 0; m < C.rows; ++m)
    for (int n = 0; n < C.colsb / 4; ++n) {
      int32_t acc;
      std::memcpy(&acc, &C.d[m][4 * n], 4);
      for (int k = 0; k < A.colsb / 4; ++k)
        for (int i = 0; i < 4; ++i)
          acc += (kSignedA ? (int32_t)(int8_t)A.d[m][4 * k + i] : (int32_t)A.d[m][4 * k + i]) *
                 (int32_t)(int8_t)B.d[k][4 * n + i];
      std::memcpy(&C.d[m][4 * n], &acc, 4);
    }
}
}  // namespace amx_emu

#define _tile_loadconfig(p) amx_emu::loadconfig(p)
#define _tile_release() amx_emu::release()
#define _tile_zero(t) amx_emu::zero(t)
#define _tile_loadd(t, base, stride) amx_emu::loadd(t, base, stride)
#define _tile_stored(t, base, stride) amx_emu::stored(t, base, stride)
#define _tile_dpbusd(c, a, b) amx_emu::dpb<false>(c, a, b)
#define _tile_dpbssd(c, a, b) amx_emu::dpb<true>(c, a, b)
