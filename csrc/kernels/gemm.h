// Ternary (packed 2-bit) x int8 GEMM: the public kernel interface.
//
// Packed weight layout "i2_b128" (docs/format.md): a [M, K] ternary matrix is
// stored row-major as uint8 [M, Kp/4], Kp = K rounded up to a multiple of 128.
// Each row is a run of 32-byte blocks; block b covers k in [128b, 128b+128)
// and byte j of it holds the codes (t+1 in {0,1,2}) of
//   k = 128b + j      in bits 0-1,   k = 128b + 32 + j  in bits 2-3,
//   k = 128b + 64 + j in bits 4-5,   k = 128b + 96 + j  in bits 6-7,
// so one shift+mask of a 32-byte load yields 32 consecutive codes.
// Padding (k >= K) holds code 1 (t = 0).
//
// Activations: int8 codes [N, Kp] (row stride Kp, zero padded), a per-token
// scale s = 127/absmax and the per-token sum of codes (used to remove the +1
// code offset: dot(t, a) = dot(t+1, a) - sum(a)).
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>
#include <string>
#include <type_traits>  // (lm_driver.h)
#include <vector>

namespace bitdlm {

constexpr int kKBlock = 128;  // weights per packed block
inline int64_t pad_k(int64_t K) { return (K + kKBlock - 1) / kKBlock * kKBlock; }

// Activation codes should start at a multiple of kActAlign bytes: the AVX-512
// tiles read every token row as 64-byte vectors, and rows that straddle cache
// lines (glibc / numpy give 16-byte alignment) cost the 2 x 8 VNNI tile up to
// 1.6x (one Sapphire Rapids core, K = 6912). ActBuffer holds them so.
constexpr size_t kActAlign = 64;

template <class T>
struct ActAllocator {
  using value_type = T;
  ActAllocator() = default;
  template <class U>
  ActAllocator(const ActAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kActAlign))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(kActAlign)); }
  bool operator==(const ActAllocator&) const { return true; }
  bool operator!=(const ActAllocator&) const { return false; }
};
using ActBuffer = std::vector<int8_t, ActAllocator<int8_t>>;

struct ActQ {
  const int8_t* q;      // [N, Kp], kActAlign-aligned for speed
  const float* scale;   // [N]  s_a = 127 / clamp(absmax, 1e-5)
  const int32_t* sum;   // [N]  sum of the int8 codes of the token
  int N;
  int Kp;
};

// One ternary matrix of a multi-GEMM.
struct TernaryW {
  const uint8_t* data;  // [M, Kp/4]
  int M;
  float scale;          // s_w = 1 / clamp(mean|W|, 1e-5)
  float* y;             // output [N, ldy], columns [0, M)
  int ldy;
};

// Quantize N rows of K floats to int8 codes, exactly as transformers' ActQuant
// (round half to even, clamp [-128, 127]); pads each row to Kp with zeros.
void quantize_act(const float* x, int N, int K, int Kp, int8_t* q, float* scale, int32_t* sum);

// y[n, m] = dot(t[m], q[n]) / (s_w * s_a[n]) for every matrix in ws, all in
// one OpenMP parallel region (q, k, v or gate, up share one quantized input).
void gemm_i2_i8(const TernaryW* ws, int n_ws, const ActQ& a);

// Exact int32 dot products dot(t[m], q[n]) -> out[n * M + m]; for tests.
void gemm_i2_i8_i32(const uint8_t* W, int M, const ActQ& a, int32_t* out);

// lm_head / output-layer GEMMs (not ternary; only the requested positions).
// fp16 weights [M, K] (row-major, IEEE half bits) x fp32 activations x [N, K]:
// y[n * ldy + m] = sum_k W[m, k] * x[n, k].
void gemm_f16_f32(const uint16_t* W, int M, int K, const float* x, int N, float* y, int ldy);
// int8 weights [M, K] with a per-row scale (w = q * wscale[m]) x int8 activations
// from quantize_act (codes [N, Kp], Kp = pad_k(K), scale s_a, sum unused):
// y[n * ldy + m] = dot(Wq[m], aq[n]) * wscale[m] / s_a[n].
void gemm_i8_i8(const int8_t* W, const float* wscale, int M, int K, const ActQ& a, float* y, int ldy);

// The ISA levels of the target architecture, worst to best (each level's CPUs
// also run every level below it). Every op family (GEMMs, attention, sampling,
// small ops) keeps one IsaTable (kernels/isa_table.h) and indexes it with
// active_isa_id(): the choice is made once (cpu features + BITDLM_ISA), never
// per call by name. The names are isa_name()'s (dispatch.cpp).
#if defined(__x86_64__)
enum class Isa : int { kScalar = 0, kAvx2, kAvx512, kAvx512Vnni, kAmx, kNumIsa };
#elif defined(__aarch64__)
// neon: ARMv8-A Advanced SIMD; dotprod: + SDOT (ARMv8.2-A); i8mm: + SMMLA (ARMv8.6-A).
enum class Isa : int { kScalar = 0, kNeon, kDotprod, kI8mm, kNumIsa };
#else
enum class Isa : int { kScalar = 0, kNumIsa };
#endif
// With the amx level, ternary GEMMs of at least this many tokens run on AMX
// tiles, fewer on the AVX-512 VNNI GEMV. 8: on the Sapphire Rapids machine
// (call2, 30 GEMM layers in forward order, 12 threads) AMX took 21.1 ms at
// N = 8 vs 28.6 for VNNI (the first kernel had lost at N = 2..8);
// bench/amx_sweep.py measures the crossover.
// BITDLM_AMX_MIN_TOKENS overrides it (read once; for measurements).
constexpr int kAmxMinTokens = 8;
// With the amx level, the int8 lm_head of at least this many tokens runs on AMX
// tiles, decode (N = 1) on the VNNI kernel: session 6's Sapphire Rapids sweep
// (128256 x 2560, 16 threads) streamed N = 1 in 1.37 ms on VNNI vs 1.89 on AMX
// (N = 8: AMX 1.61 vs VNNI 1.77). Same int32 dots and epilogue: same logits.
constexpr int kAmxLmHeadMinTokens = 2;
int amx_min_tokens();
void set_amx_min_tokens(int n);  // tests/benchmarks; std::invalid_argument if n < 1
// The level the dispatcher picked (one atomic load after the first call).
Isa active_isa_id();
// The name of a level ("scalar", "avx2", "avx512", "avx512vnni", "amx" on
// x86-64; "scalar", "neon", "dotprod", "i8mm" on aarch64).
const char* isa_name(Isa isa);
// The level of a name; std::invalid_argument if it is unknown or this CPU cannot run it.
Isa isa_level(const std::string& name);

// Name of the ISA the dispatcher picked. The first call reads BITDLM_ISA (one
// of isa_name()'s names) and throws std::runtime_error if that ISA is unknown
// or this CPU cannot run it.
const char* active_isa();
// ISAs this CPU (and build) can run, best last.
std::vector<std::string> supported_isas();
// Switch ISA in-process (tests, benchmarks); throws std::invalid_argument like
// BITDLM_ISA does. Not thread-safe against concurrent GEMM calls.
void set_isa(const std::string& name);

}  // namespace bitdlm
