// Bench builds only: lets bench_gemm_multi's "amx_keepcfg" loops keep every
// thread's tile config across GEMM calls instead of configuring and releasing
// per call (the shipped dispatch does both in every call). STTILECFG writes
// 64 zero bytes when the tiles are in INIT state (released, e.g. by a shipped
// call in between), so a released thread is configured again before any
// tile instruction runs.
#include <immintrin.h>

#include "kernels/isa.h"

namespace bitdlm {

void bench_amx_ensure_tiles() {
  alignas(64) unsigned char cfg[64];
  _tile_storeconfig(cfg);
  if (cfg[0] == 0) kAmxKernels.amx_begin();  // palette 0: not configured
}

}  // namespace bitdlm
