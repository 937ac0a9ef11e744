// The aarch64 GEMM kernels for the i8mm level, -march=armv8.2-a+dotprod+i8mm: SMMLA (Graviton 3+, Axion, Apple M2+).
// The source is gemm_arm.inc (one per algorithm for every ARM level).
#define ARM_NS i8mm
#include "kernels/gemm_arm.inc"

namespace bitdlm {
extern const KernelTable kI8mmKernels = {&i8mm::ternary, &i8mm::f16, &i8mm::i8, &i8mm::quantize,
    nullptr, nullptr, nullptr, nullptr, nullptr};  // no AMX entries
}  // namespace bitdlm
