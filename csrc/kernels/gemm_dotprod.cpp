// The aarch64 GEMM kernels for the dotprod level, -march=armv8.2-a+dotprod: SDOT (Graviton 2+, Ampere Altra, Apple M1+).
// The source is gemm_arm.inc (one per algorithm for every ARM level).
#define ARM_NS dotprod
#include "kernels/gemm_arm.inc"

namespace bitdlm {
extern const KernelTable kDotprodKernels = {&dotprod::ternary, &dotprod::f16, &dotprod::i8, &dotprod::quantize,
    nullptr, nullptr, nullptr, nullptr, nullptr};  // no AMX entries
}  // namespace bitdlm
