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

// The same for `rows` consecutive rows m0.. of token n (dots d[i] before the
// offset removal); a plain loop the compiler vectorizes (the int -> float
// conversion and the division are the scalar ones lane by lane, so it gives
// the same bits as ternary_out).
static inline void ternary_out_row(const TernaryW& w, const ActQ& a, int m0, int rows, int n,
                                   const int32_t* __restrict d, int32_t* out) {
  const int32_t s = a.sum[n];
  if (out) {
    int32_t* __restrict o = out + (int64_t)n * w.M + m0;
    for (int i = 0; i < rows; ++i) o[i] = d[i] - s;
  } else {
    float* __restrict y = w.y + (int64_t)n * w.ldy + m0;
    const float den = w.scale * a.scale[n];
    for (int i = 0; i < rows; ++i) y[i] = (float)(d[i] - s) / den;
  }
}

// int8 lm_head: y[n, m] = d * wscale[m] / s_a[n].
static inline void i8_out(const float* wscale, const ActQ& a, float* y, int ldy, int m, int n, int32_t d) {
  y[(int64_t)n * ldy + m] = (float)d * wscale[m] / a.scale[n];
}

}  // namespace bitdlm
