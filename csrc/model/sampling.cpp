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
// index of the largest, the chunks' exp sums added in chunk order, so that a
// row split over threads (greedy_split) gives the same bits as on one thread
// (greedy_row). NaN rows (no element equals the max) take the portable row.
struct ChunkedRow {
  const SelectKernels& t;
  const float* l;
  int V;
  int chunks() const { return (V + kSelectChunk - 1) / kSelectChunk; }
  const float* at(int c) const { return l + (int64_t)c * kSelectChunk; }
  int len(int c) const { return std::min(kSelectChunk, V - c * kSelectChunk); }
  float max(int c) const { return t.row_max(at(c), len(c)); }
  double sum(int c, float mx) const { return t.exp_sum(at(c), len(c), mx); }
  // The first index holding the largest of the chunks' maxima cm (-1: none), and that max.
  int first_best(const float* cm, float* mx) const {
    int cb = 0;
    for (int c = 1; c < chunks(); ++c)
      if (cm[c] > cm[cb]) cb = c;
    *mx = cm[cb];
    const int i = t.first_eq(at(cb), len(cb), *mx);
    return i < 0 ? -1 : cb * kSelectChunk + i;
  }
  void finish(int best, const double* cs, int32_t* tok, float* conf) const {
    if (best < 0) return greedy(l, V, tok, conf);
    double sum = 0;
    for (int c = 0; c < chunks(); ++c) sum += cs[c];
    *tok = best;
    *conf = (float)(1.0 / sum);
  }
};

// One thread (also inside the row-per-thread loop: no region of its own).
static void greedy_row(const SelectKernels& t, const float* l, int V, int32_t* tok, float* conf) {
  const ChunkedRow row{t, l, V};
  thread_local std::vector<float> cm;
  thread_local std::vector<double> cs;
  cm.resize(row.chunks());
  cs.resize(row.chunks());
  for (int c = 0; c < row.chunks(); ++c) cm[c] = row.max(c);
  float mx;
  const int best = row.first_best(cm.data(), &mx);
  if (best >= 0)
    for (int c = 0; c < row.chunks(); ++c) cs[c] = row.sum(c, mx);
  row.finish(best, cs.data(), tok, conf);
}

// The chunks over the team (one row of a large vocab: decoding's lm_head output).
static void greedy_split(const SelectKernels& t, const float* l, int V, int32_t* tok, float* conf) {
  const ChunkedRow row{t, l, V};
  std::vector<float> cm(row.chunks());
  std::vector<double> cs(row.chunks());
  int best = -1;
  float mx = 0.f;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int c = 0; c < row.chunks(); ++c) cm[c] = row.max(c);
#pragma omp single
    best = row.first_best(cm.data(), &mx);
    if (best >= 0) {
#pragma omp for schedule(static)
      for (int c = 0; c < row.chunks(); ++c) cs[c] = row.sum(c, mx);
    }
  }
  row.finish(best, cs.data(), tok, conf);
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
  if (rows == 1 && temperature[0] <= 0.f && V >= 2 * kSelectChunk && omp_get_max_threads() > 1) {
    greedy_split(t, logits, V, tok, conf);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) if (rows > 1)
  for (int r = 0; r < rows; ++r) {
    float* l = logits + r * ld;
    if (temperature[r] <= 0.f)
      greedy_row(t, l, V, tok + r, conf + r);
    else
      sample(l, V, temperature[r], top_p[r], uniform[r], tok + r, conf + r);
  }
}

}  // namespace bitdlm
