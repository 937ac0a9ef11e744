#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <cstring>
#include <vector>

#include <omp.h>

#include "kernels/gemm.h"
#include "kernels/isa_table.h"

namespace bitdlm {

// The portable greedy row: argmax (first on ties) and its softmax probability.
static void greedy(const float* l, int V, int32_t* tok, float* conf) {
  int best = 0;
  float mx = l[0];
  for (int i = 1; i < V; ++i)
    if (l[i] > mx) mx = l[i], best = i;
  double sum = 0;
  for (int i = 0; i < V; ++i) sum += std::exp(l[i] - mx);
  *tok = best;
  *conf = (float)(1.0 / sum);
}

static float row_max(const float* l, int n) {
  float mx = l[0];
  for (int i = 1; i < n; ++i)
    if (l[i] > mx) mx = l[i];
  return mx;
}

static int first_eq(const float* l, int n, float v) {
  for (int i = 0; i < n; ++i)
    if (l[i] == v) return i;
  return -1;
}

static double exp_sum(const float* l, int n, float mx) {
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += std::exp(l[i] - mx);
  return sum;
}

static const SelectKernels kSelectPortable = {&row_max, &first_eq, &exp_sum};

// One greedy row over kSelectChunk-sized chunks: the chunks' maxima, the first
// index of the largest, the chunks' exp sums added in chunk order. With
// `team` > 1 the chunks are split over that many threads (one row, a large
// vocab: decoding's lm_head output); the bits do not depend on it. NaN rows
// (no element equals the max) take the portable row.
static void greedy_chunked(const SelectKernels& t, const float* l, int V, int32_t* tok, float* conf, int team) {
  const int nc = (V + kSelectChunk - 1) / kSelectChunk;
  thread_local std::vector<float> cmax;
  thread_local std::vector<double> csum;
  cmax.resize(nc);
  csum.resize(nc);
  float* cm = cmax.data();
  double* cs = csum.data();
  auto len = [V](int c) { return std::min(kSelectChunk, V - c * kSelectChunk); };
  int best = -1;
  float mx = 0.f;
#pragma omp parallel num_threads(team) if (team > 1)
  {
#pragma omp for schedule(static)
    for (int c = 0; c < nc; ++c) cm[c] = t.row_max(l + (int64_t)c * kSelectChunk, len(c));
#pragma omp single
    {
      int cb = 0;
      for (int c = 1; c < nc; ++c)
        if (cm[c] > cm[cb]) cb = c;
      mx = cm[cb];
      const int i = t.first_eq(l + (int64_t)cb * kSelectChunk, len(cb), mx);
      best = i < 0 ? -1 : cb * kSelectChunk + i;
    }
    if (best >= 0) {
#pragma omp for schedule(static)
      for (int c = 0; c < nc; ++c) cs[c] = t.exp_sum(l + (int64_t)c * kSelectChunk, len(c), mx);
    }
  }
  if (best < 0) return greedy(l, V, tok, conf);
  double sum = 0;
  for (int c = 0; c < nc; ++c) sum += cs[c];
  *tok = best;
  *conf = (float)(1.0 / sum);
}

static void sample(float* l, int V, float T, float top_p, float u, int32_t* tok, float* conf) {
  float mx = -INFINITY;
  for (int i = 0; i < V; ++i) mx = std::max(mx, l[i]);
  double sum = 0;
  const float invT = 1.0f / T;
  for (int i = 0; i < V; ++i) {
    l[i] = std::exp((l[i] - mx) * invT);  // unnormalized probabilities, in place
    sum += l[i];
  }
  std::vector<int> kept;
  if (top_p < 1.0f) {
    // Nucleus by growing partial sorts: it is usually a handful of tokens.
    std::vector<int> idx(V);
    std::iota(idx.begin(), idx.end(), 0);
    auto by_prob = [l](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };
    const double lim = (double)top_p * sum;
    for (int k = std::min(V, 64);; k = std::min(V, 4 * k)) {
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), by_prob);
      kept.clear();
      double cum = 0;
      bool done = false;
      for (int j = 0; j < k; ++j) {
        if (j > 0 && cum > lim) {
          done = true;
          break;
        }
        kept.push_back(idx[j]);
        cum += l[idx[j]];
      }
      if (done || k == V) break;
    }
    std::sort(kept.begin(), kept.end());
  }
  auto pick = [&](auto&& ids, int count) {
    double total = 0;
    for (int j = 0; j < count; ++j) total += l[ids(j)];
    const double target = (double)u * total;
    double cum = 0;
    int chosen = -1;
    for (int j = 0; j < count; ++j) {
      const int id = ids(j);
      if (l[id] <= 0.f) continue;
      chosen = id;  // the last id with mass, should rounding leave cum <= target
      cum += l[id];
      if (cum > target) break;
    }
    *tok = chosen;
    *conf = (float)(l[chosen] / total);
  };
  if (top_p < 1.0f)
    pick([&](int j) { return kept[j]; }, (int)kept.size());
  else
    pick([](int j) { return j; }, V);
}

void select_rows(float* logits, int rows, int V, int64_t ld, const float* temperature, const float* top_p,
                 const float* uniform, int32_t* tok, float* conf) {
  // Greedy row pieces per ISA level (AVX-512 levels use the AVX2 ones, dotprod / i8mm the NEON ones).
  static const IsaTable<SelectKernels> tables{
      {Isa::kScalar, &kSelectPortable},
#if defined(__x86_64__)
      {Isa::kAvx2, &kSelectAvx2},
#elif defined(__aarch64__)
      {Isa::kNeon, &kSelectNeon},
#endif
  };
  const SelectKernels& t = tables.active();
  // One greedy row of a large vocab (a decoding step): its chunks over the team
  // (~0.14 ms of one thread for 128k logits on Sapphire Rapids); else a row per thread.
  if (rows == 1 && temperature[0] <= 0.f && V >= 2 * kSelectChunk) {
    greedy_chunked(t, logits, V, tok, conf, omp_get_max_threads());
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) if (rows > 1)
  for (int r = 0; r < rows; ++r) {
    float* l = logits + r * ld;
    if (temperature[r] <= 0.f)
      greedy_chunked(t, l, V, tok + r, conf + r, 1);
    else
      sample(l, V, temperature[r], top_p[r], uniform[r], tok + r, conf + r);
  }
}

}  // namespace bitdlm
