// Per-ISA kernel tables. Each ISA file (gemm_<isa>.cpp, compiled with its own
// -m / -march flags) defines its table(s); dispatch.cpp (compiled without ISA
// flags) registers them in one IsaTable (kernels/isa_table.h) and picks one at
// run time. Only plain function pointers cross the ISA boundary,
// so no inline code built with different flags can be merged by the linker.
// Every kernel here is single-threaded: it computes one tile of the output;
// dispatch.cpp owns the OpenMP region and the tiling into jobs.
#pragma once
#include "kernels/gemm.h"

namespace bitdlm {

struct KernelTable {
  // Rows [m0, m1) x tokens [n0, n1) of y = W a. out == nullptr: dequantize into
  // w.y (y = dot / (s_w * s_a), the same float expression in every ISA so all
  // tables agree bit for bit); otherwise exact int32 into out[n * w.M + m].
  void (*ternary)(const TernaryW& w, const ActQ& a, int m0, int m1, int n0, int n1, int32_t* out);
  // Rows [m0, m1) of the fp16 lm_head: y[n*ldy+m] = sum_k W[m,k] x[n,k] (fp32 accumulation).
  void (*f16)(const uint16_t* W, int K, const float* x, int N, float* y, int ldy, int m0, int m1);
  // Rows [m0, m1) of the int8 lm_head: y[n*ldy+m] = (float)dot * wscale[m] / s_a[n].
  // Activation codes must lie in [-127, 127] (quantize_act guarantees it).
  void (*i8)(const int8_t* W, const float* wscale, int K, const ActQ& a, float* y, int ldy, int m0, int m1);
  // quantize_act (gemm.h) for this ISA, bit-identical to the scalar one.
  // Any entry may be nullptr: the level below's then serves (isa_table.h).
  void (*quantize)(const float* x, int N, int K, int Kp, int8_t* q, float* scale, int32_t* sum);

  // AMX only (nullptr elsewhere): the ternary GEMM for N >= amx_min_tokens().
  // amx_act re-lays the activations of token group g (16 tokens) x k step s
  // (64 k) into a 1 KiB VNNI tile of buf (size ceil(N/16)*16 * Kp bytes);
  // amx_ternary then computes rows [m0, m1) (<= 32) x tokens [n0, n1) (n0 a
  // multiple of 16) from buf, between amx_begin() and amx_end() in the same
  // thread (tile config / release).
  void (*amx_act)(const ActQ& a, int g, int s, int8_t* buf);
  void (*amx_ternary)(const TernaryW& w, const ActQ& a, const int8_t* buf, int m0, int m1, int n0, int n1,
                      int32_t* out);
  void (*amx_begin)();
  void (*amx_end)();
  // AMX int8 lm_head: rows [m0, m1) (m1 - m0 a multiple of 16; K a multiple of
  // 64) x all a.N tokens from buf (amx_act's tiles of a), between amx_begin()
  // and amx_end(); y as the i8 entry.
  void (*amx_i8)(const int8_t* W, const float* wscale, int K, const ActQ& a, const int8_t* buf, float* y, int ldy,
                 int m0, int m1);
};

// Rows per AMX ternary job: 2 groups of 32 rows sharing K-sliced activation
// panels (gemm_amx.cpp). The fastest job shape of the Sapphire Rapids sweep
// (16 threads, the 30 GEMM layers of the 2B shape in forward order: 15.6 ms at
// N = 32 vs 16.9 for 32-row jobs, 18.8 for 128-row ones; docs/kernels.md).
constexpr int kAmxRowBlock = 64;
// Bench builds only (csrc/bench/, BITDLM_BENCH_KERNELS): run the AMX ternary
// GEMMs through another tile kernel with jobs of `rows` (<= 128) rows;
// fn == nullptr restores the shipped kernel and kAmxRowBlock (dispatch.cpp).
using AmxTernaryFn = void (*)(const TernaryW&, const ActQ&, const int8_t*, int, int, int, int, int32_t*);
void set_amx_ternary_kernel(AmxTernaryFn fn, int rows);

extern const KernelTable kScalarKernels;
#if defined(__x86_64__)
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;      // AVX-512 F/BW/VL, maddubs + madd
extern const KernelTable kAvx512VnniKernels;  // same file, vpdpbusd inner loop
extern const KernelTable kAmxKernels;         // AMX tiles for N >= amx_min_tokens(); the rest from VNNI
#elif defined(__aarch64__)
extern const KernelTable kNeonKernels;     // gemm_neon.cpp: SMLAL into int16
extern const KernelTable kDotprodKernels;  // gemm_dotprod.cpp: SDOT
extern const KernelTable kI8mmKernels;     // gemm_i8mm.cpp: SMMLA for token pairs, SDOT otherwise
#endif

// IEEE binary16 bits -> float, exact for normals, subnormals, inf and NaN.
// Pure integer code: usable in baseline (no F16C) files. static: each ISA file
// keeps its own copy, so the linker never hands baseline code an AVX build.
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {
    // subnormal: mant * 2^-24, exact in float
    const float f = (float)mant * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

}  // namespace bitdlm
