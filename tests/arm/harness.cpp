// Bit-exactness harness for the aarch64 kernels on x86 machines: built with
// aarch64-linux-gnu-g++ (each gemm_<level>.cpp with its CMake flags) and run
// under qemu-aarch64 by tests/test_arm.py. Checks the dispatcher's feature
// detection against the levels the emulated CPU should have (argv[1], e.g.
// "scalar,neon,dotprod,i8mm" for -cpu max, "scalar,neon" for cortex-a53), then
// every table it supports against the scalar reference (tests/kernel_checks.h),
// and the threaded GEMM drivers on the picked level. Prints one line per
// failure and "OK <cases>"; exit status 0 only if everything matched.
#include <omp.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernel_checks.h"
#include "kernels/isa.h"

// Through the dispatcher (OpenMP jobs, BITDLM_ISA / set_isa): the multi-GEMM's
// dequantized outputs and the int32 entry vs scalar, with 3 threads.
static void check_dispatch(const char* isa, int M, int K, int N) {
  const int Kp = (int)pad_k(K), kb = Kp / 4;
  std::vector<uint8_t> w((size_t)M * kb);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < Kp; ++k) {
      const int code = k < K ? (int)(rnd() % 3) : 1;
      w[(size_t)m * kb + (k / 128) * 32 + k % 32] |= (uint8_t)(code << (2 * ((k % 128) / 32)));
    }
  std::vector<float> x((size_t)N * K);
  for (auto& v : x) v = (float)((int)(rnd() % 2001) - 1000) / 100.f;
  std::vector<int8_t> q((size_t)N * Kp);
  std::vector<float> s(N);
  std::vector<int32_t> sum(N);
  set_isa("scalar");
  quantize_act(x.data(), N, K, Kp, q.data(), s.data(), sum.data());
  const ActQ a{q.data(), s.data(), sum.data(), N, Kp};
  std::vector<int32_t> ref((size_t)N * M), got((size_t)N * M);
  gemm_i2_i8_i32(w.data(), M, a, ref.data());
  std::vector<float> yref((size_t)N * M), ygot((size_t)N * M);
  TernaryW wr{w.data(), M, 0.41f, yref.data(), M};
  gemm_i2_i8(&wr, 1, a);
  set_isa(isa);
  std::vector<int8_t> q2((size_t)N * Kp);
  std::vector<float> s2(N);
  std::vector<int32_t> sum2(N);
  quantize_act(x.data(), N, K, Kp, q2.data(), s2.data(), sum2.data());
  gemm_i2_i8_i32(w.data(), M, a, got.data());
  TernaryW wg{w.data(), M, 0.41f, ygot.data(), M};
  gemm_i2_i8(&wg, 1, a);
  ++g_cases;
  if (q != q2 || s != s2 || sum != sum2 || ref != got || yref != ygot) {
    ++g_fail;
    std::printf("FAIL %s dispatch M=%d K=%d N=%d\n", isa, M, K, N);
  }
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: harness LEVEL,LEVEL,...  (the levels this CPU must report)\n");
    return 2;
  }
  std::string have;
  for (const auto& n : supported_isas()) have += (have.empty() ? "" : ",") + n;
  if (have != argv[1]) {
    ++g_fail;
    std::printf("FAIL supported_isas: %s, expected %s\n", have.c_str(), argv[1]);
  }
  std::printf("supported: %s; picked: %s\n", have.c_str(), active_isa());
  const struct {
    Isa level;
    const KernelTable* table;
  } levels[] = {{Isa::kNeon, &kNeonKernels}, {Isa::kDotprod, &kDotprodKernels}, {Isa::kI8mm, &kI8mmKernels}};
  for (const auto& l : levels) {
    const char* name = isa_name(l.level);
    if (have.find(name) == std::string::npos) {
      // not runnable here: asking for it must fail with a clear message
      try {
        set_isa(name);
        ++g_fail;
        std::printf("FAIL set_isa(%s) accepted on a CPU without it\n", name);
      } catch (const std::invalid_argument& e) {
        std::printf("%s: %s\n", name, e.what());
      }
      continue;
    }
    check_table(*l.table, name);
    omp_set_num_threads(3);
    for (int N : {1, 2, 7, 8, 33}) check_dispatch(name, 70, 2560, N);
    check_dispatch(name, 40, 6912, 9);
  }
  std::printf("%s %d cases, %d failed\n", g_fail ? "FAILED" : "OK", g_cases, g_fail);
  return g_fail ? 1 : 0;
}
