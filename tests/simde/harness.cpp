// Bit-exactness harness for the AVX-512 kernels on machines without AVX-512:
// gemm_avx512.cpp and gemm_avx512vnni.cpp are compiled against SIMDe
// (-DBITDLM_SIMDE, no -mavx512 flags) and compared with the scalar reference
// on random and odd shapes; gemm_amx.cpp and the bench-only AMX variants
// (csrc/bench/amx_variants_amx.cpp) too, with the AMX tiles emulated
// (tests/simde/amx_emu.h, injected with -include by tests/test_kernels.py).
// Prints one line per failure and "OK <cases>";
// exit status 0 only if everything matched. Run by tests/test_kernels.py.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bench/amx_variants.h"  // the bench-only AMX variants (amx_variants_amx.cpp, compiled in here too)
#include "kernels/isa.h"
#include "../kernel_checks.h"

using namespace bitdlm;

// The AMX kernel (gemm_amx.cpp against SIMDe + the tile emulator) driven like
// dispatch.cpp drives it: activations re-laid out, tiles configured, jobs of
// amx_row_block(variant) rows x <= 64 tokens (token chunks start at multiples
// of 16), released.
static void check_amx(int M, int K, int N, int act_lo, int act_hi, int code_mode) {
  const int Kp = (int)pad_k(K);
  const RandomTernaryCase tc(M, K, N, act_lo, act_hi, code_mode);
  const ActQ& a = tc.acts.a;
  std::vector<int32_t> got((size_t)N * M, -7);
  std::vector<float> ygot((size_t)N * M, -7.f);
  const TernaryW wg = tc.weights(ygot);
  const int groups = (N + 15) / 16, steps = Kp / 64;
  std::vector<int8_t> vb((size_t)groups * 16 * Kp + 64);
  int8_t* vba = (int8_t*)(((uintptr_t)vb.data() + 63) / 64 * 64);
  for (int i = 0; i < groups * steps; ++i) kAmxKernels.amx_act(a, i / steps, i % steps, vba);
  // the shipped kernel (kAmxRowBlock-row jobs), then the bench-only variants
  // (csrc/bench/amx_variants_amx.cpp: bits 1 L1 unpack, 8 prefetch, 16
  // pipelined unpack, 32 / 64 64- / 128-row jobs, 128 one unpack stream over
  // the job, 256 stream depth 3) with the job heights bench/amx_sweep.py gives
  // them; some runs also with 32-token jobs
  struct Case {
    int variant, chunk;
  };
  for (const Case c : {Case{-1, 64}, Case{-1, 32}, Case{0, 64}, Case{1, 64}, Case{1 | 8, 64}, Case{1 | 16, 64},
                       Case{1 | 8 | 16, 32}, Case{32 | 8 | 16, 64}, Case{64, 32}, Case{64 | 16, 64},
                       Case{128 | 32 | 1 | 16, 64}, Case{128 | 32 | 1 | 16, 32}, Case{128 | 256 | 32 | 1 | 16, 64},
                       Case{128 | 256 | 32 | 1 | 16, 32}, Case{128, 64}, Case{128 | 64 | 8, 64},
                       Case{128 | 256 | 64, 32}}) {
    AmxTernaryFn fn = kAmxKernels.amx_ternary;
    int rb = kAmxRowBlock;
    if (c.variant >= 0) {
      g_amx_bench_variant = c.variant;
      fn = kAmxVariantTiles;
      rb = (c.variant & 64) ? 128 : (c.variant & 32) ? 64 : 32;
    }
    std::fill(got.begin(), got.end(), -7);
    std::fill(ygot.begin(), ygot.end(), -7.f);
    kAmxKernels.amx_begin();
    for (int pass = 0; pass < 2; ++pass)
      for (int m0 = 0; m0 < M; m0 += rb)
        for (int n0 = 0; n0 < N; n0 += c.chunk) {
          const int m1 = m0 + rb < M ? m0 + rb : M, n1 = n0 + c.chunk < N ? n0 + c.chunk : N;
          fn(wg, a, vba, m0, m1, n0, n1, pass ? nullptr : got.data());
        }
    kAmxKernels.amx_end();
    ++g_cases;
    if (!tc.matches(got, ygot)) {
      ++g_fail;
      std::printf("FAIL amx ternary variant=%d (-1: shipped) chunk=%d M=%d K=%d N=%d act=[%d,%d] codes=%d\n",
                  c.variant, c.chunk, M, K, N, act_lo, act_hi, code_mode);
    }
  }
}

// The AMX int8 lm_head (TDPBSSD, weights as A tiles straight from the matrix)
// driven like dispatch.cpp's gemm_i8_i8: jobs of a multiple of 16 rows.
static void check_amx_i8(int M, int K, int N, int job = 64) {
  const int Kp = (int)pad_k(K);
  const RandomI8Case c(M, K, N);
  std::vector<float> got((size_t)N * M, -7.f);
  const int groups = (N + 15) / 16, steps = Kp / 64;
  std::vector<int8_t> vb((size_t)groups * 16 * Kp + 64);
  int8_t* vba = (int8_t*)(((uintptr_t)vb.data() + 63) / 64 * 64);
  for (int i = 0; i < groups * steps; ++i) kAmxKernels.amx_act(c.a, i / steps, i % steps, vba);
  // (the kernel picks its prefetch by N: per row for N <= 16, next group above)
  kAmxKernels.amx_begin();
  for (int m0 = 0; m0 < M; m0 += job)  // (dispatch: 256-row jobs; 64 exercises more job ends)
    kAmxKernels.amx_i8(c.w.data(), c.ws.data(), K, c.a, vba, got.data(), M, m0, m0 + job < M ? m0 + job : M);
  kAmxKernels.amx_end();
  ++g_cases;
  if (std::memcmp(c.ref.data(), got.data(), c.ref.size() * 4)) {
    ++g_fail;
    std::printf("FAIL amx i8 M=%d K=%d N=%d\n", M, K, N);
  }
}

int main(int argc, char** argv) {
  if (argc == 5 && !std::strcmp(argv[1], "amx")) {  // debug: one AMX case in isolation
    check_amx(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), -128, 127, 0);
    std::printf("%s %d cases, %d failed\n", g_fail ? "FAILED" : "OK", g_cases, g_fail);
    return g_fail ? 1 : 0;
  }
  // AMX first (single case runnable alone: harness amx M K N)
  for (int N : {2, 3, 15, 16, 17, 33, 40, 64, 65})
    for (int M : {1, 16, 17, 45, 100, 161}) check_amx(M, 257, N, -128, 127, 0);
  check_amx(33, 64, 5, -128, 127, 0);
  check_amx(20, 6912, 17, -128, 127, 0);  // long K (down_proj)
  check_amx(130, 1280, 33, -128, 127, 0);  // several K slices x groups (64- / 128-row jobs)
  check_amx(19, 2560, 32, -128, 127, 3);  // all -1 / all +1 rows
  check_amx(16, 1000, 8, 127, 127, 2);
  check_amx(16, 1000, 8, -128, -128, 1);
  check_amx(7, 1, 2, -128, 127, 0);
  for (int N : {1, 2, 8, 16, 17, 32, 33, 40})
    for (int M : {16, 48, 80}) check_amx_i8(M, 320, N);
  check_amx_i8(32, 2560, 8);
  check_amx_i8(208, 640, 9, 256);  // one job of 7 groups (next-group prefetch), as dispatch runs it
  const KernelTable* tables[] = {&kAvx512Kernels, &kAvx512VnniKernels};
  const char* table_names[] = {"avx512", "avx512vnni"};
  const int Ns[] = {1, 2, 3, 4, 5, 8, 31, 32, 33};
  for (int j = 0; j < 2; ++j) {
    const KernelTable* t = tables[j];
    const char* name = table_names[j];
    for (int N : Ns) {
      check_ternary(*t, name, 13, 257, N, -128, 127);
      check_ternary(*t, name, 9, 128, N, -128, 127);
    }
    check_ternary(*t, name, 16, 2560, 8, -128, 127);
    check_ternary(*t, name, 5, 6912, 3, 127, 127);    // int16 worst cases
    check_ternary(*t, name, 5, 6912, 2, -128, -128);
    check_ternary(*t, name, 1, 1, 1, -128, 127);
    for (int N : {1, 3, 4, 6}) {
      check_i8(*t, name, 9, 100, N);
      check_i8(*t, name, 6, 64, N);
      check_i8(*t, name, 5, 129, N);
      check_f16(*t, name, 7, 37, N);
      check_f16(*t, name, 5, 256, N);
    }
    check_i8(*t, name, 4, 2560, 2);
    check_i8(*t, name, 70, 3000, 5);   // several row panels and K slices (lm_driver.h)
    check_i8(*t, name, 9, 700, 35);    // two token chunks
    check_i8(*t, name, 13, 4000, 17);  // 8-token tiles over K slices, odd rows
    check_i8(*t, name, 6, 3000, 1);    // decode tile
    check_f16(*t, name, 3, 1, 1);
    if (t->quantize)  // (nullptr: the table takes the level below's quantizer)
      for (int K : {1, 31, 32, 33, 100, 2560, 2561}) check_quantize(*t, name, 3, K);
  }
  // token tiles (VNNI 2 x 8, BW 4 x 4) with every tail, 32-row panels with
  // row tails, K slices (T x Kp > 24 KiB), int32 worst cases
  for (int j = 0; j < 2; ++j) {
    const KernelTable* t = tables[j];
    for (int N : {9, 12, 15, 16, 17, 25, 33}) check_ternary(*t, table_names[j], 13, 257, N, -128, 127);
    check_ternary(*t, table_names[j], 70, 384, 16, -128, 127);   // 3 panels, odd row tail
    check_ternary(*t, table_names[j], 5, 6912, 17, -128, 127);   // K slices (down_proj), tails
    check_ternary(*t, table_names[j], 3, 6912, 16, 127, 127);    // long rows, extreme activations
    check_ternary(*t, table_names[j], 3, 6912, 16, -128, -128);
  }
  std::printf("%s %d cases, %d failed\n", g_fail ? "FAILED" : "OK", g_cases, g_fail);
  return g_fail ? 1 : 0;
}
