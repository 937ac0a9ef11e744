#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <cstring>
#include <vector>

#include "kernels/gemm.h"
#include "kernels/isa_table.h"

namespace bitdlm {

static bool greedy(const float* l, int V, int32_t* tok, float* conf) {
  int best = 0;
  float mx = l[0];
  for (int i = 1; i < V; ++i)
    if (l[i] > mx) mx = l[i], best = i;
  double sum = 0;
  for (int i = 0; i < V; ++i) sum += std::exp(l[i] - mx);
  *tok = best;
  *conf = (float)(1.0 / sum);
  return true;
}

static const SelectKernels kSelectPortable = {&greedy};

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
  // Greedy row kernel per ISA level (AVX-512 levels use the AVX2 one, dotprod / i8mm the NEON one).
  static const IsaTable<SelectKernels> tables{
      {Isa::kScalar, &kSelectPortable},
#if defined(__x86_64__)
      {Isa::kAvx2, &kSelectAvx2},
#elif defined(__aarch64__)
      {Isa::kNeon, &kSelectNeon},
#endif
  };
  const SelectKernels& t = tables.active();
#pragma omp parallel for schedule(dynamic, 1) if (rows > 1)
  for (int r = 0; r < rows; ++r) {
    float* l = logits + r * ld;
    if (temperature[r] <= 0.f) {
      if (!t.greedy(l, V, tok + r, conf + r)) greedy(l, V, tok + r, conf + r);
    } else {
      sample(l, V, temperature[r], top_p[r], uniform[r], tok + r, conf + r);
    }
  }
}

}  // namespace bitdlm
