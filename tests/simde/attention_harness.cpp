// The AVX-512 attention kernels (csrc/model/attention_avx512.cpp, compiled
// against SIMDe with -DBITDLM_SIMDE) against plain loops written here, on odd
// shapes (row tails, key tails, head_dim not a multiple of 16). Prints "OK <cases>,
// 0 failed" when every value is within a tight relative tolerance (the exp
// polynomial and the summation order differ from std::exp in the last bits).
// Run by tests/test_forward.py.
#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/isa.h"
#include "model/attention.h"
#include "model/half.h"

using namespace bitdlm;

static uint64_t g_state = 0x9E3779B97F4A7C15ull;
static float frand() {  // xorshift64* -> [-1, 1)
  g_state ^= g_state >> 12;
  g_state ^= g_state << 25;
  g_state ^= g_state >> 27;
  return (float)((g_state * 0x2545F4914F6CDD1Dull) >> 40) / (float)(1 << 23) - 1.0f;
}
static int g_fail = 0, g_cases = 0;

static void expect_close(const char* what, const float* a, const float* b, int n, int R, int nk, int d) {
  ++g_cases;
  for (int i = 0; i < n; ++i)
    if (!(std::fabs(a[i] - b[i]) <= 1e-5f * std::fabs(b[i]) + 1e-6f)) {
      std::printf("FAIL %s R=%d nk=%d d=%d at %d: %g vs %g\n", what, R, nk, d, i, a[i], b[i]);
      ++g_fail;
      return;
    }
}

static void run(int R, int nk, int d) {
  const AttnKernels& t = kAttnAvx512Own;
  const int ldkt = kAttnTile, nk8 = (nk + 7) & ~7;
  std::vector<float> Q((size_t)R * d), KT((size_t)d * ldkt, 0.f), V((size_t)nk * d);
  for (auto& x : Q) x = frand();
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < nk; ++j) KT[(size_t)i * ldkt + j] = frand();
  for (auto& x : V) x = frand();
  std::vector<uint16_t> Vh(V.size());
  for (size_t i = 0; i < V.size(); ++i) Vh[i] = f32_to_f16(V[i]), V[i] = half_to_float(Vh[i]);
  const float scale = 0.3f;
  // scores
  std::vector<float> S((size_t)R * kAttnTile, -7.f), Sr(S);
  t.qk(Q.data(), R, KT.data(), ldkt, nk, d, scale, S.data(), kAttnTile);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < nk8; ++j) {
      float a = 0.f;
      for (int i = 0; i < d; ++i) a += Q[(size_t)r * d + i] * KT[(size_t)i * ldkt + j];
      Sr[(size_t)r * kAttnTile + j] = a * scale;
    }
  expect_close("qk", S.data(), Sr.data(), (int)S.size(), R, nk, d);
  // online softmax from a running state
  std::vector<float> m(R), l(R), mr(R), lr(R), O((size_t)R * d), Or;
  for (int r = 0; r < R; ++r) m[r] = mr[r] = r % 3 == 0 ? -INFINITY : 0.2f * r, l[r] = lr[r] = 1.5f;
  for (auto& x : O) x = frand();
  Or = O;
  t.softmax_tile(S.data(), kAttnTile, R, nk, m.data(), l.data(), O.data(), d);
  for (int r = 0; r < R; ++r) {
    float* s = Sr.data() + (size_t)r * kAttnTile;
    float mx = mr[r];
    for (int j = 0; j < nk; ++j) mx = std::max(mx, s[j]);
    const float alpha = mr[r] == -INFINITY ? 0.f : std::exp(mr[r] - mx);
    float sum = 0.f;
    for (int j = 0; j < nk; ++j) s[j] = std::exp(s[j] - mx), sum += s[j];
    lr[r] = lr[r] * alpha + sum, mr[r] = mx;
    for (int i = 0; i < d; ++i) Or[(size_t)r * d + i] *= alpha;
  }
  expect_close("softmax S", S.data(), Sr.data(), (int)S.size(), R, nk, d);
  expect_close("softmax m", m.data(), mr.data(), R, R, nk, d);
  expect_close("softmax l", l.data(), lr.data(), R, R, nk, d);
  expect_close("softmax O", O.data(), Or.data(), (int)O.size(), R, nk, d);
  // values, fp32 and fp16
  std::vector<float> O2 = O, O3 = O;
  t.pv_f32(Sr.data(), kAttnTile, R, V.data(), d, nk, d, O2.data());
  t.pv_f16(Sr.data(), kAttnTile, R, Vh.data(), d, nk, d, O3.data());
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < d; ++i) {
      float a = O[(size_t)r * d + i];
      for (int j = 0; j < nk; ++j) a += Sr[(size_t)r * kAttnTile + j] * V[(size_t)j * d + i];
      Or[(size_t)r * d + i] = a;
    }
  expect_close("pv_f32", O2.data(), Or.data(), (int)O2.size(), R, nk, d);
  expect_close("pv_f16", O3.data(), Or.data(), (int)O3.size(), R, nk, d);
}

int main() {
  for (int R : {1, 2, 3, 4, 7, 32})
    for (int nk : {1, 7, 8, 17, 40, 64})
      for (int d : {12, 16, 64, 72, 128}) run(R, nk, d);
  std::printf("OK %d cases, %d failed\n", g_cases, g_fail);
  return g_fail ? 1 : 0;
}
