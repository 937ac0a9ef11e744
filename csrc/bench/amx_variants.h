// The AMX ternary kernel variants of bench builds (amx_variants_amx.cpp,
// docs/kernels.md): their bit flags, the variant the shipped kernel is, and the
// selection bind_bench.cpp sets (validated there) and the variant kernel reads.
#pragma once

#include "kernels/isa.h"

namespace bitdlm {

constexpr int kAmxL1Unpack = 1, kAmxPrefetch = 8, kAmxPipeline = 16, kAmxRows64 = 32, kAmxRows128 = 64;
// session 12: one unpack pipeline over the whole job (kAmxStream), 3 items deep (kAmxDeep, only with kAmxStream)
constexpr int kAmxStream = 128, kAmxDeep = 256;
constexpr int kAmxVariantBits =
    kAmxL1Unpack | kAmxPrefetch | kAmxPipeline | kAmxRows64 | kAmxRows128 | kAmxStream | kAmxDeep;
// a valid selection: known bits only, kAmxDeep only with kAmxStream (bind_bench.cpp's check)
constexpr bool amx_variant_ok(int v) {
  return v >= 0 && !(v & ~kAmxVariantBits) && (!(v & kAmxDeep) || (v & kAmxStream));
}
// = gemm_amx.cpp's kernel (kAmxRowBlock rows); kAmxL1Unpack | kAmxRows64 (33) before session 6
constexpr int kAmxShipped = kAmxL1Unpack | kAmxPipeline | kAmxRows64;

extern int g_amx_bench_variant;
extern const AmxTernaryFn kAmxVariantTiles;

}  // namespace bitdlm
