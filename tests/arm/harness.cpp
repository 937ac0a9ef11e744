// Bit-exactness harness for the aarch64 kernels on x86 machines: built with
// aarch64-linux-gnu-g++ (each gemm_<level>.cpp with its CMake flags) and run
// under qemu-aarch64 by tests/test_arm.py. Checks the dispatcher's feature
// detection against the levels the emulated CPU should have (argv[1], e.g.
// "scalar,neon,dotprod,i8mm" for -cpu max, "scalar,neon" for cortex-a53), then
// every table it supports against the scalar reference (tests/kernel_checks.h),
// and the threaded GEMM drivers on the picked level; then the NEON attention
// table against the portable one and plain loops, and the NEON greedy select
// against the portable one. Prints one line per failure and "OK <cases>"; exit
// status 0 only if everything matched.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernel_checks.h"
#include "kernels/isa.h"
#include "model/attention.h"
#include "model/half.h"
#include "model/sampling.h"

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

// The NEON attention table (attention_neon.cpp, as the aarch64 levels resolve
// it) on odd shapes: conversions and transposes bit-exact against the portable
// table, sums within 1e-5 of the magnitude of their terms of a double-precision
// loop written here (the portable table is held to the same bound), fp32 -> fp16
// bit-exact against the portable encoder (finite values, ties, subnormals, overflow).
static float frand() { return (float)((int)(rnd() % 20001) - 10000) / 10000.f; }

static void expect(bool ok, const char* what, int R, int nk, int d) {
  ++g_cases;
  if (!ok) {
    ++g_fail;
    std::printf("FAIL neon %s R=%d nk=%d d=%d\n", what, R, nk, d);
  }
}

template <class T>
static void check_attention(const AttnKernels& t, const AttnKernels& ref, int R, int nk, int d) {
  const int64_t ld = d + 3;  // K/V rows strided like the cache / fresh rows
  std::vector<T> K((size_t)nk * ld), V((size_t)nk * ld);
  for (auto* v : {&K, &V})
    for (auto& x : *v) {
      const float f = frand();
      if constexpr (sizeof(T) == 2) x = f32_to_f16(f); else x = f;
    }
  auto val = [](T x) { if constexpr (sizeof(T) == 2) return (double)half_to_float(x); else return (double)x; };
  std::vector<float> Q((size_t)R * d), P((size_t)R * kAttnTile);
  for (auto& x : Q) x = frand();
  for (auto& x : P) x = 0.5f * (frand() + 1.f);
  const float scale = 0.37f;
  const bool f16 = sizeof(T) == 2;
  // transposed key tile: bit-exact
  const int ldkt = kAttnTile;
  std::vector<float> kt1((size_t)d * ldkt, -7.f), kt2((size_t)d * ldkt, -7.f);
  const int nj = (nk + 7) & ~7;
  if constexpr (sizeof(T) == 2) {
    t.k_tile_f16(K.data(), ld, nk, d, kt1.data(), ldkt), ref.k_tile_f16(K.data(), ld, nk, d, kt2.data(), ldkt);
    std::vector<float> v1((size_t)nk * d), v2((size_t)nk * d);
    t.v_tile_f16(V.data(), ld, nk, d, v1.data()), ref.v_tile_f16(V.data(), ld, nk, d, v2.data());
    expect(v1 == v2, "v_tile_f16", R, nk, d);
  } else {
    t.k_tile_f32(K.data(), ld, nk, d, kt1.data(), ldkt), ref.k_tile_f32(K.data(), ld, nk, d, kt2.data(), ldkt);
  }
  expect(kt1 == kt2, f16 ? "k_tile_f16" : "k_tile_f32", R, nk, d);
  // scores, tiled and direct
  auto scores_ok = [&](const std::vector<float>& S) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < nk; ++j) {
        double acc = 0, mag = 0;
        for (int i = 0; i < d; ++i) {
          const double p = (double)Q[(size_t)r * d + i] * val(K[j * ld + i]);
          acc += p, mag += std::fabs(p);
        }
        if (!(std::fabs(S[(size_t)r * kAttnTile + j] - acc * scale) <= 1e-5 * mag * scale + 1e-7)) return false;
      }
    return true;
  };
  for (const AttnKernels* k : {&t, &ref}) {
    std::vector<float> S((size_t)R * kAttnTile, -7.f), Sd((size_t)R * kAttnTile, -7.f);
    k->qk(Q.data(), R, kt2.data(), ldkt, nk, d, scale, S.data(), kAttnTile);
    bool pad = true;  // the zero key columns up to round8(nk) score 0
    for (int r = 0; r < R; ++r)
      for (int j = nk; j < nj; ++j) pad &= S[(size_t)r * kAttnTile + j] == 0.f;
    expect(scores_ok(S) && pad, k == &t ? "qk" : "qk (portable)", R, nk, d);
    if constexpr (sizeof(T) == 2)
      k->qk_direct_f16(Q.data(), R, K.data(), ld, nk, d, scale, Sd.data(), kAttnTile);
    else
      k->qk_direct_f32(Q.data(), R, K.data(), ld, nk, d, scale, Sd.data(), kAttnTile);
    expect(scores_ok(Sd), k == &t ? "qk_direct" : "qk_direct (portable)", R, nk, d);
    // values: O += P V on top of an existing O
    std::vector<float> O((size_t)R * d);
    for (auto& x : O) x = frand();
    const std::vector<float> O0 = O;
    if constexpr (sizeof(T) == 2)
      k->pv_f16(P.data(), kAttnTile, R, V.data(), ld, nk, d, O.data());
    else
      k->pv_f32(P.data(), kAttnTile, R, V.data(), ld, nk, d, O.data());
    bool ok = true;
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < d; ++i) {
        double acc = O0[(size_t)r * d + i], mag = std::fabs(acc);
        for (int j = 0; j < nk; ++j) {
          const double p = (double)P[(size_t)r * kAttnTile + j] * val(V[j * ld + i]);
          acc += p, mag += std::fabs(p);
        }
        ok &= std::fabs(O[(size_t)r * d + i] - acc) <= 1e-5 * mag + 1e-7;
      }
    expect(ok, k == &t ? "pv" : "pv (portable)", R, nk, d);
  }
}

// Online softmax of a key tile (exp_neg: ~1e-7 relative against std::exp) from a
// running state, against double-precision loops: exps within 2e-6 relative (or
// 1e-25 absolute: exps below e^-60 are flushed to 0), sums and rescaled outputs
// within 2e-6 relative. Scores span [-70, 10] around the running maxima.
static void check_softmax(const AttnKernels& t, int R, int n, int d) {
  std::vector<float> S((size_t)R * kAttnTile), m(R), l(R), O((size_t)R * d);
  for (auto& x : S) x = 40.f * frand() - 30.f;
  for (int r = 0; r < R; ++r) m[r] = r % 3 == 0 ? -INFINITY : 8.f * frand(), l[r] = 1.5f;
  for (auto& x : O) x = frand();
  const std::vector<float> S0 = S, m0 = m, l0 = l, O0 = O;
  t.softmax_tile(S.data(), kAttnTile, R, n, m.data(), l.data(), O.data(), d);
  auto near = [](double got, double want, double abs) { return std::fabs(got - want) <= 2e-6 * std::fabs(want) + abs; };
  bool ok = true;
  for (int r = 0; r < R; ++r) {
    const float* s0 = S0.data() + (size_t)r * kAttnTile;
    float mx = m0[r];
    for (int j = 0; j < n; ++j) mx = s0[j] > mx ? s0[j] : mx;
    const double alpha = m0[r] == -INFINITY ? 0.0 : std::exp((double)m0[r] - mx);
    double sum = 0;
    for (int j = 0; j < n; ++j) {
      const double e = std::exp((double)s0[j] - mx);
      ok &= near(S[(size_t)r * kAttnTile + j], e, 1e-25);
      sum += e;
    }
    ok &= m[r] == mx && near(l[r], l0[r] * alpha + sum, 0);
    for (int i = 0; i < d; ++i) ok &= near(O[(size_t)r * d + i], O0[(size_t)r * d + i] * alpha, 1e-30);
  }
  expect(ok, "softmax_tile", R, n, d);
}

// The greedy select (temperature 0) at `level` against the portable one (the
// scalar level): the same token (the first of tied maxima), the confidence
// within 1e-6 relative; banned (-inf) ids, maxima in the vector tail, a NaN row
// (the NEON kernel hands it to the portable code).
static void check_greedy(const char* level) {
  for (int V : {1, 3, 4, 5, 17, 1000, 8195, 20000}) {
    const int rows = 6;
    std::vector<float> x((size_t)rows * V);
    for (auto& v : x) v = 12.f * frand();
    for (int i = 0; i < V; i += 3) x[i] = -INFINITY;                 // row 0 (and others): banned ids
    x[(size_t)1 * V + V / 2] = x[(size_t)1 * V + V - 1] = 20.f;    // row 1: tie, the first wins
    x[(size_t)2 * V + V - 1] = 30.f;                                // row 2: the max in the tail
    x[(size_t)3 * V + V / 3] = NAN;                                 // row 3: NaN
    for (int i = 0; i < V; ++i) x[(size_t)4 * V + i] = -3.f;        // row 4: all equal
    const std::vector<float> temp(rows, 0.f), top_p(rows, 1.f), u(rows, 0.5f);
    std::vector<int32_t> tok_ref(rows), tok(rows);
    std::vector<float> conf_ref(rows), conf(rows), x2 = x;
    set_isa("scalar");
    select_rows(x.data(), rows, V, V, temp.data(), top_p.data(), u.data(), tok_ref.data(), conf_ref.data());
    set_isa(level);
    select_rows(x2.data(), rows, V, V, temp.data(), top_p.data(), u.data(), tok.data(), conf.data());
    bool ok = tok == tok_ref;
    for (int r = 0; r < rows; ++r)
      ok &= std::fabs(conf[r] - conf_ref[r]) <= 1e-6f * conf_ref[r] || (std::isnan(conf[r]) && std::isnan(conf_ref[r]));
    // each row alone (a large vocab's single row is split over the team): the same bits
    for (int r = 0; r < rows; ++r) {
      std::vector<float> one(x.begin() + (size_t)r * V, x.begin() + (size_t)(r + 1) * V);
      int32_t t1;
      float c1;
      select_rows(one.data(), 1, V, V, temp.data(), top_p.data(), u.data(), &t1, &c1);
      ok &= t1 == tok[r] && (c1 == conf[r] || (std::isnan(c1) && std::isnan(conf[r])));
    }
    expect(ok, "greedy select", rows, V, 0);
  }
}

static void check_to_f16(const AttnKernels& t) {
  std::vector<float> x;
  for (int i = 0; i < 4000; ++i) x.push_back(frand() * (float)(1 << (rnd() % 20)) / 1024.f);
  for (float v : {0.f, -0.f, 65504.f, 65520.f, 1e9f, -1e9f, 6e-8f, 3e-8f, 2.98e-8f, 1e-10f, 1.00048828125f,
                  1.00146484375f, 5.9604645e-8f, -6.1035156e-5f})
    x.push_back(v);
  std::vector<uint16_t> a(x.size()), b(x.size());
  t.to_f16(x.data(), a.data(), (int)x.size());
  for (size_t i = 0; i < x.size(); ++i) b[i] = f32_to_f16(x[i]);
  expect(a == b, "to_f16", 0, (int)x.size(), 0);
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
  // attention: the table every ARM level resolves to (they share it)
  const AttnKernels& at = attn_kernels(Isa::kNeon);
  for (int R : {1, 3, 4, 5, 9})
    for (int nk : {1, 5, 8, 13, 64})
      for (int d : {4, 12, 32, 37, 80}) {
        check_attention<float>(at, kAttnPortable, R, nk, d);
        check_attention<uint16_t>(at, kAttnPortable, R, nk, d);
        check_softmax(at, R, nk, d);
      }
  check_softmax(kAttnPortable, 9, 64, 80);  // the reference loops hold for std::exp too
  check_to_f16(at);
  expect(at.softmax_tile != kAttnPortable.softmax_tile && attn_kernels(Isa::kI8mm).qk == at.qk, "table resolution",
         0, 0, 0);
  for (const auto& l : levels)  // every ARM level resolves to the NEON select
    if (have.find(isa_name(l.level)) != std::string::npos) check_greedy(isa_name(l.level));
  std::printf("%s %d cases, %d failed\n", g_fail ? "FAILED" : "OK", g_cases, g_fail);
  return g_fail ? 1 : 0;
}
