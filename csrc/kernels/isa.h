// Per-ISA kernel tables. Each ISA file (gemm_<isa>.cpp, compiled with its own
// -m flags) defines one table; dispatch.cpp (compiled without ISA flags) picks
// one at run time. Only plain function pointers cross the ISA boundary, so no
// inline code built with different flags can be merged by the linker.
#pragma once
#include "kernels/gemm.h"

namespace bitdlm {

struct KernelTable {
  const char* name;
  // Rows [m0, m1) of y = W x a (dequantized into w.y); a single thread's share.
  void (*gemm_rows)(const TernaryW& w, const ActQ& a, int m0, int m1);
  // Same rows, exact int32 into out[n * w.M + m]; for tests.
  void (*gemm_rows_i32)(const TernaryW& w, const ActQ& a, int m0, int m1, int32_t* out);
};

extern const KernelTable kScalarKernels;

}  // namespace bitdlm
