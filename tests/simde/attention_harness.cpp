// The AVX-512 attention kernels (csrc/model/attention_avx512.cpp, compiled
// against SIMDe with -DBITDLM_SIMDE) against plain loops written here, on odd
// shapes (row tails, key tails, head_dim not a multiple of 16). Prints "OK <cases>,
// 0 failed" when every value is within a tight relative tolerance (the exp
// polynomial and the summation order differ from std::exp in the last bits).
// Run by tests/test_forward.py.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <utility>
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
  // (the row-major scores kernel is gone: the lanes path, run_lanes below, computes them)
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < nk8; ++j) {
      float a = 0.f;
      for (int i = 0; i < d; ++i) a += Q[(size_t)r * d + i] * KT[(size_t)i * ldkt + j];
      S[(size_t)r * kAttnTile + j] = Sr[(size_t)r * kAttnTile + j] = a * scale;
    }
  // scores straight from K rows (decoding, R <= 4), fp32 and fp16 rows at an odd stride
  if (R <= kAttnDirectRows) {
    const int64_t ld = d + 3;
    std::vector<float> K((size_t)nk * ld), Sd((size_t)R * kAttnTile, -9.f), Sh(Sd), Shr((size_t)R * nk);
    std::vector<uint16_t> Kh(K.size());
    for (int j = 0; j < nk; ++j)
      for (int i = 0; i < d; ++i) {
        K[(size_t)j * ld + i] = KT[(size_t)i * ldkt + j];
        Kh[(size_t)j * ld + i] = f32_to_f16(K[(size_t)j * ld + i]);
      }
    t.qk_direct_f32(Q.data(), R, K.data(), ld, nk, d, scale, Sd.data(), kAttnTile);
    t.qk_direct_f16(Q.data(), R, Kh.data(), ld, nk, d, scale, Sh.data(), kAttnTile);
    std::vector<float> got((size_t)R * nk), goth(got.size()), ref(got.size());
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < nk; ++j) {
        float a = 0.f;
        for (int i = 0; i < d; ++i) a += Q[(size_t)r * d + i] * half_to_float(Kh[(size_t)j * ld + i]);
        Shr[(size_t)r * nk + j] = a * scale;
        got[(size_t)r * nk + j] = Sd[(size_t)r * kAttnTile + j];
        goth[(size_t)r * nk + j] = Sh[(size_t)r * kAttnTile + j];
        ref[(size_t)r * nk + j] = S[(size_t)r * kAttnTile + j];
      }
    expect_close("qk_direct_f32", got.data(), ref.data(), (int)got.size(), R, nk, d);
    expect_close("qk_direct_f16", goth.data(), Shr.data(), (int)goth.size(), R, nk, d);
    for (int r = 0; r < R; ++r)  // nothing past the nk keys is written
      for (int j = nk; j < kAttnTile; ++j)
        if (Sd[(size_t)r * kAttnTile + j] != -9.f || Sh[(size_t)r * kAttnTile + j] != -9.f) {
          std::printf("FAIL qk_direct wrote past nk R=%d nk=%d d=%d\n", R, nk, d);
          ++g_fail;
          r = R;
          break;
        }
  }
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

// The rows-in-lanes path (seg_lanes_*, to_lanes, from_lanes, merge_lanes): R rows
// (queries x `group` heads) against nk keys cut into two units at `cut`, each
// unit in two segments, merged; against softmax attention in plain loops.
// causal: query i of nq sees only its keys [0, nk - (nq - 1 - i)) (seg_lanes' lim; a row may see
// none of a unit's keys).
static void run_lanes(int R, int group, int nk, int cut, int d, bool f16, bool causal = false) {
  const AttnKernels& t = kAttnAvx512Own;
  const int Rp = (R + 15) & ~15, nq = (R + group - 1) / group;
  const int64_t ldq = (int64_t)group * d + 5;  // rows of one query contiguous, queries apart
  std::vector<float> Q((size_t)nq * ldq), K((size_t)nk * d), V((size_t)nk * d);
  for (auto& x : Q) x = 2.f * frand();
  for (auto& x : K) x = frand();
  for (auto& x : V) x = frand();
  std::vector<uint16_t> Kh(K.size()), Vh(V.size());
  for (size_t i = 0; i < K.size(); ++i) Kh[i] = f32_to_f16(K[i]), K[i] = half_to_float(Kh[i]);
  for (size_t i = 0; i < V.size(); ++i) Vh[i] = f32_to_f16(V[i]), V[i] = half_to_float(Vh[i]);
  const float scale = 0.25f;
  auto row = [&](int r) { return Q.data() + (int64_t)(r / group) * ldq + (int64_t)(r % group) * d; };
  auto keys = [&](int r) { return causal ? nk - (nq - 1 - r / group) : nk; };  // row r sees [0, keys(r))
  std::vector<float> ref((size_t)R * d);
  for (int r = 0; r < R; ++r) {
    const int nk = keys(r);
    std::vector<double> s(nk);
    double mx = -1e300, sum = 0;
    for (int j = 0; j < nk; ++j) {
      double a = 0;
      for (int i = 0; i < d; ++i) a += (double)row(r)[i] * K[(size_t)j * d + i];
      s[j] = a * scale, mx = std::max(mx, s[j]);
    }
    for (int j = 0; j < nk; ++j) s[j] = std::exp(s[j] - mx), sum += s[j];
    for (int i = 0; i < d; ++i) {
      double a = 0;
      for (int j = 0; j < nk; ++j) a += s[j] * V[(size_t)j * d + i];
      ref[(size_t)r * d + i] = (float)(a / sum);
    }
  }
  const int64_t slot = (int64_t)Rp * (d + 2);
  std::vector<float> QT((size_t)Rp * d), parts(2 * slot), ST((size_t)kAttnTile * Rp), tile((size_t)kAttnTile * d);
  t.to_lanes(Q.data(), ldq, group, R, d, QT.data(), Rp);
  for (int u = 0; u < 2; ++u) {
    const int k0 = u ? cut : 0, k1 = u ? nk : cut, mid = k0 + (k1 - k0) / 3;
    float* OT = parts.data() + u * slot;
    float *m = OT + (int64_t)Rp * d, *l = m + Rp;
    for (int r = 0; r < Rp; ++r) m[r] = -INFINITY, l[r] = 0.f;
    std::fill(OT, OT + (int64_t)Rp * d, NAN);  // unread while m = -inf
    for (auto [a, b] : {std::pair<int, int>{k0, mid}, {mid, k1}}) {
      if (a >= b) continue;
      std::vector<float> lim(Rp);  // the segment's keys [a, b) as seen by each row
      for (int r = 0; r < Rp; ++r) lim[r] = r < R ? (float)(keys(r) - a) : (float)(b - a);
      const float* lp = causal ? lim.data() : nullptr;
      if (f16)
        t.seg_lanes_f16(QT.data(), Rp, Kh.data() + (size_t)a * d, Vh.data() + (size_t)a * d, d, b - a, d, scale, m, l,
                        OT, ST.data(), tile.data(), lp);
      else
        t.seg_lanes_f32(QT.data(), Rp, K.data() + (size_t)a * d, V.data() + (size_t)a * d, d, b - a, d, scale, m, l,
                        OT, ST.data(), tile.data(), lp);
    }
  }
  std::vector<float> OT((size_t)Rp * d), inv(Rp), O((size_t)nq * ldq, -9.f);
  t.merge_lanes(parts.data(), slot, 2, Rp, d, OT.data(), inv.data());
  t.from_lanes(OT.data(), Rp, R, d, inv.data(), O.data(), ldq, group);
  std::vector<float> got((size_t)R * d);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < d; ++i) got[(size_t)r * d + i] = O[(size_t)(r / group) * ldq + (r % group) * d + i];
  ++g_cases;
  for (size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(got[i] - ref[i]) <= 1e-5f * std::fabs(ref[i]) + 2e-6f)) {
      std::printf("FAIL lanes R=%d group=%d nk=%d cut=%d d=%d f16=%d causal=%d at %zu: %g vs %g\n", R, group, nk, cut,
                  d, (int)f16, (int)causal, i, got[i], ref[i]);
      ++g_fail;
      return;
    }
}

int main() {
  for (int R : {1, 2, 3, 4, 7, 32})
    for (int nk : {1, 7, 8, 17, 40, 64})
      for (int d : {12, 16, 64, 72, 128}) run(R, nk, d);
  for (auto [R, group] : {std::pair<int, int>{5, 1}, {12, 3}, {32, 4}, {48, 4}, {64, 8}, {80, 16}})
    for (int nk : {2, 70, 200})
      for (int d : {12, 64, 128})
        for (bool f16 : {false, true}) run_lanes(R, group, nk, nk / 2 + 1, d, f16);
  // causal rows (block size 1): 2-8 queries, limits inside one key tile, across tiles and units
  for (auto [R, group] : {std::pair<int, int>{8, 4}, {12, 3}, {32, 4}, {64, 8}, {30, 5}})
    for (int nk : {8, 70, 200})
      for (int cut : {nk / 2 + 1, nk - 2})
        for (bool f16 : {false, true}) run_lanes(R, group, nk, cut, 64, f16, true);
  std::printf("OK %d cases, %d failed\n", g_cases, g_fail);
  return g_fail ? 1 : 0;
}
