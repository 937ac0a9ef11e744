// AVX-512 F/BW/VL kernels (maddubs + madd; no VNNI). Built with the AVX-512
// flags minus VNNI, or against SIMDe for tests/simde (-DBITDLM_SIMDE).
// GCC 12 warns "__Y is used uninitialized" inside its own AVX-512 cast /
// extract / insert intrinsics (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels/epilogue.h"
#include "kernels/isa.h"
#include "kernels/simd512.h"

namespace bitdlm {
namespace avx512 {
#define BITDLM_VNNI 0
#include "kernels/gemm_avx512.inc"
#undef BITDLM_VNNI
}  // namespace avx512

extern const KernelTable kAvx512Kernels = {&avx512::ternary, &avx512::f16, &avx512::i8, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace bitdlm
