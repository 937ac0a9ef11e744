// AMX int8 peak for bench/kernels.py (AMX flags; called only when the
// dispatcher lists amx, i.e. cpuid has AMX-INT8 and Linux granted the tile
// state). Per thread: 4 accumulator tiles fed by 2 x 2 operand tiles that stay
// loaded, so only TDPBSSD runs in the loop (16 x 16 x 64 = 16384 MAC each).
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "bench/team_timer.h"

namespace bitdlm {

double bench_peak_amx(int threads, int64_t iters) {
  const double s = team_seconds(
      threads,
      [] {  // per thread, untimed: tile config, 4 zeroed accumulators, 4 loaded operands
        struct alignas(64) {
          uint8_t palette_id, start_row, reserved[14];
          uint16_t colsb[16];
          uint8_t rows[16];
        } cfg;
        std::memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int i = 0; i < 8; ++i) {
          cfg.colsb[i] = 64;
          cfg.rows[i] = 16;
        }
        alignas(64) int8_t src[16 * 64];
        for (int i = 0; i < 16 * 64; ++i) src[i] = (int8_t)(i % 7 - 3);
        _tile_loadconfig(&cfg);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        _tile_loadd(4, src, 64);
        _tile_loadd(5, src, 64);
        _tile_loadd(6, src, 64);
        _tile_loadd(7, src, 64);
      },
      [&] {
        for (int64_t i = 0; i < iters; ++i) {
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
        }
        alignas(64) int32_t out[16 * 16];
        _tile_stored(0, out, 64);  // keeps the chain observable
        _tile_release();
        volatile int32_t sink = out[0];
        (void)sink;
      });
  return (double)threads * iters * 4 * 16384 / s;
}

}  // namespace bitdlm
