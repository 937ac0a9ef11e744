// The checks of one kernel table against the scalar reference, shared by the
// harnesses that build ISA kernels for machines that cannot run them natively:
// tests/simde/harness.cpp (AVX-512 / AMX under SIMDe) and tests/arm/harness.cpp
// (aarch64 kernels under qemu-aarch64). Ternary, int8 lm_head and quantizer
// results must match bit for bit; fp16 lm_head ones within a bound from the
// magnitudes (the summation order differs). Each failure prints one line.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kernels/isa.h"

using namespace bitdlm;

static uint64_t g_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd() {  // xorshift64*
  g_state ^= g_state >> 12;
  g_state ^= g_state << 25;
  g_state ^= g_state >> 27;
  return (uint32_t)((g_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static int g_fail = 0, g_cases = 0;

// M x K packed i2_b128 weights. code_mode 0: random; 1: all -1 rows; 2: all +1
// rows; 3: alternate rows. Padding (k >= K) holds code 1 (t = 0).
static std::vector<uint8_t> random_ternary(int M, int K, int code_mode = 0) {
  const int Kp = (int)pad_k(K), kb = Kp / 4;
  std::vector<uint8_t> w((size_t)M * kb);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < Kp; ++k) {
      int code = (int)(rnd() % 3);
      if (code_mode == 1 || (code_mode == 3 && m % 2)) code = 0;
      if (code_mode == 2 || (code_mode == 3 && !(m % 2))) code = 2;
      if (k >= K) code = 1;
      const int b = k / 128, i = (k % 128) / 32, j = k % 32;
      w[(size_t)m * kb + b * 32 + j] |= (uint8_t)(code << (2 * i));
    }
  return w;
}

// N x K quantized activations in [lo, hi] (padded to Kp with zeros), their
// scales and sums, and the ActQ over them (the struct owns the buffers).
struct RandomActs {
  std::vector<int8_t> q;
  std::vector<float> s;
  std::vector<int32_t> sum;
  ActQ a;
  RandomActs(int N, int K, int lo, int hi) : q((size_t)N * pad_k(K), 0), s(N), sum(N, 0) {
    const int Kp = (int)pad_k(K);
    for (int n = 0; n < N; ++n) {
      for (int k = 0; k < K; ++k) {
        const int v = lo + (int)(rnd() % (uint32_t)(hi - lo + 1));
        q[(size_t)n * Kp + k] = (int8_t)v;
        sum[n] += v;
      }
      s[n] = 0.5f + (float)(rnd() % 1000) / 37.0f;
    }
    a = ActQ{q.data(), s.data(), sum.data(), N, Kp};
  }
  RandomActs(const RandomActs&) = delete;
  RandomActs& operator=(const RandomActs&) = delete;
};

// A ternary GEMM case: random_ternary weights (scale 0.37), RandomActs, and the
// scalar results (int32 dots `ref`, dequantized `yref`) to compare a kernel's with.
struct RandomTernaryCase {
  int M, N;
  std::vector<uint8_t> w;
  RandomActs acts;
  std::vector<int32_t> ref;
  std::vector<float> yref;
  RandomTernaryCase(int M_, int K, int N_, int act_lo, int act_hi, int code_mode = 0)
      : M(M_), N(N_), w(random_ternary(M_, K, code_mode)), acts(N_, K, act_lo, act_hi), ref((size_t)N_ * M_),
        yref((size_t)N_ * M_) {
    const TernaryW wr = weights(yref);
    kScalarKernels.ternary(wr, acts.a, 0, M, 0, N, ref.data());
    kScalarKernels.ternary(wr, acts.a, 0, M, 0, N, nullptr);
  }
  // the weights, dequantized outputs going to y ([N, M])
  TernaryW weights(std::vector<float>& y) const { return TernaryW{w.data(), M, 0.37f, y.data(), M}; }
  bool matches(const std::vector<int32_t>& got, const std::vector<float>& ygot) const {
    return !std::memcmp(ref.data(), got.data(), ref.size() * 4) &&
           !std::memcmp(yref.data(), ygot.data(), yref.size() * 4);
  }
  RandomTernaryCase(const RandomTernaryCase&) = delete;
  RandomTernaryCase& operator=(const RandomTernaryCase&) = delete;
};

static void check_ternary(const KernelTable& kt, const char* name, int M, int K, int N, int act_lo, int act_hi) {
  const RandomTernaryCase c(M, K, N, act_lo, act_hi);
  const ActQ& a = c.acts.a;
  std::vector<int32_t> got((size_t)N * M, -7);
  std::vector<float> ygot((size_t)N * M, -7.f);
  const TernaryW wg = c.weights(ygot);
  // split the work into two row ranges and two token ranges like the dispatcher
  const int mh = M / 2, nh = N / 2;
  kt.ternary(wg, a, 0, mh, 0, nh, got.data());
  kt.ternary(wg, a, mh, M, 0, nh, got.data());
  kt.ternary(wg, a, 0, mh, nh, N, got.data());
  kt.ternary(wg, a, mh, M, nh, N, got.data());
  kt.ternary(wg, a, 0, M, 0, N, nullptr);
  ++g_cases;
  if (!c.matches(got, ygot)) {
    ++g_fail;
    std::printf("FAIL %s ternary M=%d K=%d N=%d acts[%d,%d]\n", name, M, K, N, act_lo, act_hi);
  }
}

// An int8 lm_head case: M x K int8 weights (-128 included) with row scales, N
// tokens of activations in [-127, 127] padded to Kp, and the scalar result `ref`.
struct RandomI8Case {
  int M, K, N;
  std::vector<int8_t> w, q;
  std::vector<float> ws, s, ref;
  ActQ a;
  RandomI8Case(int M_, int K_, int N_)
      : M(M_), K(K_), N(N_), w((size_t)M * K), q((size_t)N * pad_k(K), 0), ws(M), s(N), ref((size_t)N * M) {
    const int Kp = (int)pad_k(K);
    for (auto& v : w) v = (int8_t)(rnd() % 256);
    for (int m = 0; m < M; ++m) ws[m] = 0.001f + (float)(rnd() % 1000) * 1e-4f;
    for (int n = 0; n < N; ++n) {
      for (int k = 0; k < K; ++k) q[(size_t)n * Kp + k] = (int8_t)((int)(rnd() % 255) - 127);
      s[n] = 1.f + (float)(rnd() % 100);
    }
    a = ActQ{q.data(), s.data(), nullptr, N, Kp};
    kScalarKernels.i8(w.data(), ws.data(), K, a, ref.data(), M, 0, M);
  }
  RandomI8Case(const RandomI8Case&) = delete;
  RandomI8Case& operator=(const RandomI8Case&) = delete;
};

static void check_i8(const KernelTable& kt, const char* name, int M, int K, int N) {
  const RandomI8Case c(M, K, N);
  std::vector<float> got((size_t)N * M, -7.f);
  kt.i8(c.w.data(), c.ws.data(), K, c.a, got.data(), M, 0, M / 2);
  kt.i8(c.w.data(), c.ws.data(), K, c.a, got.data(), M, M / 2, M);
  ++g_cases;
  if (std::memcmp(c.ref.data(), got.data(), c.ref.size() * 4)) {
    ++g_fail;
    std::printf("FAIL %s i8 M=%d K=%d N=%d\n", name, M, K, N);
  }
}

static void check_f16(const KernelTable& kt, const char* name, int M, int K, int N) {
  std::vector<uint16_t> w((size_t)M * K);
  std::vector<float> x((size_t)N * K);
  for (auto& v : w) {
    // random finite halves incl. subnormals: exponent field 0..29
    v = (uint16_t)(((rnd() & 1) << 15) | ((rnd() % 30) << 10) | (rnd() & 0x3ff));
  }
  for (auto& v : x) v = (float)((int)(rnd() % 2001) - 1000) / 1000.f;
  std::vector<float> ref((size_t)N * M), got((size_t)N * M, -7.f);
  kScalarKernels.f16(w.data(), K, x.data(), N, ref.data(), M, 0, M);
  kt.f16(w.data(), K, x.data(), N, got.data(), M, 0, M / 2);
  kt.f16(w.data(), K, x.data(), N, got.data(), M, M / 2, M);
  ++g_cases;
  for (int n = 0; n < N; ++n)
    for (int m = 0; m < M; ++m) {
      double mag = 0;  // error bound from the magnitudes (summation order differs)
      for (int k = 0; k < K; ++k) mag += std::fabs((double)half_to_float(w[(size_t)m * K + k]) * x[(size_t)n * K + k]);
      const double err = std::fabs((double)ref[(size_t)n * M + m] - got[(size_t)n * M + m]);
      if (!(err <= 2e-6 * mag + 1e-30)) {
        ++g_fail;
        std::printf("FAIL %s f16 M=%d K=%d N=%d at (%d,%d): %g vs %g\n", name, M, K, N, n, m,
                    ref[(size_t)n * M + m], got[(size_t)n * M + m]);
        return;
      }
    }
}

// quantize_act of N rows of K floats (with zeros, ties at .5 and values that
// clamp at -128) against the scalar quantizer: codes, scales and sums.
static void check_quantize(const KernelTable& kt, const char* name, int N, int K) {
  const int Kp = (int)pad_k(K);
  std::vector<float> x((size_t)N * K);
  for (size_t i = 0; i < x.size(); ++i) {
    const uint32_t r = rnd();
    x[i] = r % 7 == 0 ? 0.f : r % 11 == 0 ? 0.5f * (float)((int)(rnd() % 255) - 127) : (float)((int)(r % 20001) - 10000) / 997.f;
  }
  if (N > 1)  // the last row far below the 1e-5 absmax clamp
    for (int k = 0; k < K; ++k) x[(size_t)(N - 1) * K + k] = (float)((int)(rnd() % 201) - 100) * 1e-8f;
  std::vector<int8_t> qr((size_t)N * Kp, 9), qg((size_t)N * Kp, 9);
  std::vector<float> sr(N), sg(N);
  std::vector<int32_t> ur(N), ug(N);
  kScalarKernels.quantize(x.data(), N, K, Kp, qr.data(), sr.data(), ur.data());
  kt.quantize(x.data(), N, K, Kp, qg.data(), sg.data(), ug.data());
  ++g_cases;
  if (qr != qg || std::memcmp(sr.data(), sg.data(), 4 * N) || ur != ug) {
    ++g_fail;
    std::printf("FAIL %s quantize N=%d K=%d\n", name, N, K);
  }
}

// Every entry of a table on random and odd shapes (row / token / K tails,
// int16 worst cases, several lm_head panels and K slices, the decode tiles).
static void check_table(const KernelTable& kt, const char* name) {
  for (int N : {1, 2, 3, 4, 5, 8, 31, 32, 33}) {
    check_ternary(kt, name, 13, 257, N, -128, 127);
    check_ternary(kt, name, 9, 128, N, -128, 127);
  }
  check_ternary(kt, name, 16, 2560, 8, -128, 127);
  check_ternary(kt, name, 5, 6912, 3, 127, 127);    // int16 worst cases
  check_ternary(kt, name, 5, 6912, 2, -128, -128);
  check_ternary(kt, name, 1, 1, 1, -128, 127);
  for (int N : {1, 3, 4, 6}) {
    check_i8(kt, name, 9, 100, N);
    check_i8(kt, name, 6, 64, N);
    check_i8(kt, name, 5, 129, N);
    check_f16(kt, name, 7, 37, N);
    check_f16(kt, name, 5, 256, N);
  }
  check_i8(kt, name, 4, 2560, 2);
  check_i8(kt, name, 70, 3000, 5);   // several row panels and K slices (lm_driver.h)
  check_i8(kt, name, 9, 700, 35);    // two token chunks
  check_i8(kt, name, 6, 3000, 1);    // decode tile
  check_f16(kt, name, 3, 1, 1);
  if (kt.quantize)  // (nullptr: the table takes the level below's quantizer)
    for (int K : {1, 31, 32, 33, 100, 2560, 2561}) check_quantize(kt, name, 3, K);
}
