// The forward's small-op row drivers timed alone (bench/kernels.py part 5): one
// parallel region over N rows, empty or running a fused op, right after a
// region that wrote the rows either the way a GEMM leaves them (each thread a
// slice of the columns of every row) or row by row on the threads that then
// read them. The difference between the three says whether a small-op phase
// of the forward profile is the region's fork / join, cross-core traffic or
// the arithmetic.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "kernels/gemm.h"
#include "model/smallops.h"

namespace bitdlm {

// op 0: empty for_rows region; 1: add_norm_quant_rows (x += d); 2: act_norm_quant_rows.
std::vector<double> bench_rows(const SmallOps& t, int op, int N, int K, int threads, int reps, bool gemm_layout) {
  if (op < 0 || op > 2 || N < 1 || K < 1 || threads < 1 || reps < 1) throw std::invalid_argument("bench_rows: bad argument");
  const int Kp = (int)pad_k(K), saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  std::vector<float> x((size_t)N * K), d((size_t)N * K), w(K, 1.0f), s(N);
  std::vector<int8_t> q((size_t)N * Kp);
  std::vector<int32_t> sum(N);
  std::vector<double> out;
  for (int rep = 0; rep < reps; ++rep) {
#pragma omp parallel num_threads(threads)
    {
      const int T = omp_get_num_threads(), me = omp_get_thread_num();
      auto fill = [&](int r, int c0, int c1) {
        for (int c = c0; c < c1; ++c) {
          x[(size_t)r * K + c] = (float)((r * 7 + c * 13 + rep) % 29) - 14.0f;
          d[(size_t)r * K + c] = (float)((r * 3 + c * 5) % 17) - 8.0f;
        }
      };
      if (gemm_layout) {
        for (int r = 0; r < N; ++r) fill(r, (int)((int64_t)K * me / T), (int)((int64_t)K * (me + 1) / T));
      } else {
#pragma omp for schedule(static)
        for (int r = 0; r < N; ++r) fill(r, 0, K);
      }
    }
    const double t0 = omp_get_wtime();
    if (op == 0)
      for_rows(N, [&](int r) { s[r] = 0.0f; });
    else if (op == 1)
      add_norm_quant_rows(t, x.data(), d.data(), w.data(), N, K, 1e-5f, q.data(), s.data(), sum.data(), Kp);
    else
      act_norm_quant_rows(t, x.data(), d.data(), w.data(), N, K, 1e-5f, q.data(), s.data(), sum.data(), Kp);
    out.push_back(omp_get_wtime() - t0);
  }
  omp_set_num_threads(saved);
  return out;
}

}  // namespace bitdlm
