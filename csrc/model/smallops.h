// The small per-row ops of the forward (everything between the GEMMs and
// attention), fused where they touch the same data, one table per ISA.
//
// One source (smallops.inc) is compiled per ISA: smallops.cpp (baseline, also
// the drivers), smallops_avx2.cpp, smallops_avx512.cpp. (On aarch64 the
// baseline build is already NEON-vectorized: its one table serves every level.) The kernels are
// written as fixed 16-lane loops that the compiler vectorizes for each target (the quantizer
// on GCC / clang vector types of the table's width, SMALLOPS_LANES),
// with FMA contraction off, so every table computes the same IEEE operations
// in the same order: all ISAs agree bit for bit (tests/test_forward.py).
// The RMSNorm sum of squares follows torch's fp32 sum order with 8-float
// vectors (smallops.inc), so the norms round as transformers' BitNetRMSNorm does
// on torch's AVX2 / default CPU capability (tests/test_forward.py checks both).
#pragma once
#include <cstdint>

#include "kernels/gemm.h"

namespace bitdlm {

// Per-row kernels (single-threaded; the drivers below own the parallel region).
struct SmallOps {
  // x += d (d may be null: x is left alone), then the normalized row
  // w * x * rsqrt(mean(x^2) + eps) is quantized exactly like quantize_act
  // (codes padded to Kp, scale, code sum). `tmp` holds K floats.
  void (*add_norm_quant)(float* x, const float* d, const float* w, int K, int Kp, float eps, float* tmp, int8_t* q,
                         float* scale, int32_t* sum);
  // g = relu(g)^2 * u, then norm + quantize as above (g keeps the product).
  void (*act_norm_quant)(float* g, const float* u, const float* w, int K, int Kp, float eps, float* tmp, int8_t* q,
                         float* scale, int32_t* sum);
  // y = w * x * rsqrt(mean(x^2) + eps); y may equal x.
  void (*rmsnorm)(const float* x, const float* w, float* y, int K, float eps);
  // rotate_half RoPE of `heads` heads of hd values (one token row).
  void (*rope)(float* v, const float* cos, const float* sin, int heads, int hd);
  // fp16 bits -> fp32 (embedding rows).
  void (*f16_row)(const uint16_t* e, float* x, int n);
  // int8 row with its scale -> fp32: x = float(q) * scale, one rounding per value
  // (int8 embedding rows; docs/format.md).
  void (*i8_row)(const int8_t* q, float scale, float* x, int n);
};

extern const SmallOps kSmallOpsScalar;
#if defined(__x86_64__)
extern const SmallOps kSmallOpsAvx2;
extern const SmallOps kSmallOpsAvx512;
#endif
// The table for an ISA level (levels without their own table use the best lower one).
const SmallOps& small_ops(Isa isa);
inline const SmallOps& small_ops() { return small_ops(active_isa_id()); }

// Drivers: rows [0, N) in one OpenMP parallel region each (rows are independent),
// with the GEMMs' whole team and a static schedule (smallops.cpp says why).
// x[N, K] (+ d), codes into a (q [N, Kp], scale, sum) with Kp = a.Kp.
void add_norm_quant_rows(const SmallOps& t, float* x, const float* d, const float* w, int N, int K, float eps,
                         int8_t* q, float* scale, int32_t* sum, int Kp);
void act_norm_quant_rows(const SmallOps& t, float* g, const float* u, const float* w, int N, int K, float eps,
                         int8_t* q, float* scale, int32_t* sum, int Kp);
void rmsnorm_rows(const SmallOps& t, const float* x, const float* w, float* y, int N, int K, float eps);
// Any other per-row op f(r) of the forward (embedding, RoPE + cache write, final norm).
int rows_team(int N);
template <class F>
void for_rows(int N, F&& f) {
  const int nt = rows_team(N);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int r = 0; r < N; ++r) f(r);
}

}  // namespace bitdlm
