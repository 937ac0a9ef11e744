// The aarch64 GEMM kernels for the neon level, ARMv8-A Advanced SIMD (every aarch64 CPU; built without -march flags).
// The source is gemm_arm.inc (one per algorithm for every ARM level).
#define ARM_NS neon
#include "kernels/gemm_arm.inc"

namespace bitdlm {
extern const KernelTable kNeonKernels = {&neon::ternary, &neon::f16, &neon::i8, &neon::quantize,
    nullptr, nullptr, nullptr, nullptr, nullptr};  // no AMX entries
}  // namespace bitdlm
