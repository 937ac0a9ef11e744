// AVX-512 VNNI kernels: the gemm_avx512.inc bodies with vpdpbusd (u8 x s8 ->
// int32, no int16 stage). Built with -mavx512vnni, or against SIMDe for tests.
// GCC 12 warns "__Y is used uninitialized" inside its own AVX-512 cast /
// extract / insert intrinsics (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels/epilogue.h"
#include "kernels/isa.h"
#include "kernels/simd512.h"

namespace bitdlm {
namespace avx512vnni {
#define BITDLM_VNNI 1
#include "kernels/gemm_avx512.inc"
#undef BITDLM_VNNI
}  // namespace avx512vnni

extern const KernelTable kAvx512VnniKernels = {&avx512vnni::ternary, &avx512vnni::f16, &avx512vnni::i8, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace bitdlm
