// The one dequant epilogue of every GEMM kernel (all ISAs). Included by each
// ISA file: everything is static, so each translation unit keeps its own copy
// built with its own flags (no inline symbol shared across -m flags). The float
// expressions are the contract that makes all ISAs agree bit for bit.
#pragma once
#include "kernels/gemm.h"

namespace bitdlm {

// Exact int32 dot d = dot(t[m], q[n]) of a ternary GEMM: into out[n * M + m]
// (int32 mode, out != nullptr) or dequantized into w.y.
static inline void ternary_out(const TernaryW& w, const ActQ& a, int m, int n, int32_t d, int32_t* out) {
  if (out)
    out[(int64_t)n * w.M + m] = d;
  else
    w.y[(int64_t)n * w.ldy + m] = (float)d / (w.scale * a.scale[n]);
}

// int8 lm_head: y[n, m] = d * wscale[m] / s_a[n].
static inline void i8_out(const float* wscale, const ActQ& a, float* y, int ldy, int m, int n, int32_t d) {
  y[(int64_t)n * ldy + m] = (float)d * wscale[m] / a.scale[n];
}

}  // namespace bitdlm
