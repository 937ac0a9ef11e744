// The small per-row ops of the forward (everything between the GEMMs and
// attention), fused where they touch the same data, one table per ISA.
//
// One source (smallops.inc) is compiled per ISA: smallops.cpp (baseline, also
// the drivers), smallops_avx2.cpp, smallops_avx512.cpp. (On aarch64 the
// baseline build is already NEON-vectorized: its one table serves every level.) The kernels are
// written as fixed 16-lane loops that the compiler vectorizes for each target,
// with FMA contraction off, so every table computes the same IEEE operations
// in the same order: all ISAs agree bit for bit (tests/test_forward.py).
// The RMSNorm sum of squares uses 16 partial sums (lane l takes elements
// i = l mod 16) and the fixed tree ((l, l+8), then +4, +2, +1).
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
};

extern const SmallOps kSmallOpsScalar;
#if defined(__x86_64__)
extern const SmallOps kSmallOpsAvx2;
extern const SmallOps kSmallOpsAvx512;
#endif
// The table for an ISA level (levels without their own table use the best lower one).
const SmallOps& small_ops(Isa isa);
inline const SmallOps& small_ops() { return small_ops(active_isa_id()); }

// Drivers: rows [0, N) in one OpenMP parallel region each (rows are independent).
// x[N, K] (+ d), codes into a (q [N, Kp], scale, sum) with Kp = a.Kp.
void add_norm_quant_rows(const SmallOps& t, float* x, const float* d, const float* w, int N, int K, float eps,
                         int8_t* q, float* scale, int32_t* sum, int Kp);
void act_norm_quant_rows(const SmallOps& t, float* g, const float* u, const float* w, int N, int K, float eps,
                         int8_t* q, float* scale, int32_t* sum, int Kp);
void rmsnorm_rows(const SmallOps& t, const float* x, const float* w, float* y, int N, int K, float eps);
// Threads for a region over N small rows: the fewest that give every thread
// the same ceil(N / max_threads) rows (used with schedule(static)).
int small_ops_team(int N);

}  // namespace bitdlm
