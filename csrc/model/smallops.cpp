// The baseline (scalar) small-op table, the table array and the row drivers.
#define SMALLOPS_NS scalar
#define SMALLOPS_TABLE kSmallOpsScalar
#define SMALLOPS_LANES 4
#include "model/smallops.inc"

#include <omp.h>

#include <vector>

#include "kernels/isa_table.h"

namespace bitdlm {

const SmallOps& small_ops(Isa isa) {
  // AVX-512 VNNI and AMX add nothing these ops use: they take the AVX-512 table.
  static const IsaTable<SmallOps> tables{
      {Isa::kScalar, &kSmallOpsScalar},
#if defined(__x86_64__)
      {Isa::kAvx2, &kSmallOpsAvx2},
      {Isa::kAvx512, &kSmallOpsAvx512},
#endif
  };
  return tables[isa];
}

// One parallel region per fused op, each costing a fork/join that is worth
// more than the rows' arithmetic (32 rows x 2560 floats are ~2 us of work per
// thread): a static schedule (no shared counter), and each thread keeps its row
// of scratch across calls instead of allocating it per region. The team is
// always the GEMMs' full team, even when there are fewer rows than threads:
// a region with fewer threads leaves the rest of libgomp's pool docked, and
// waking them again for the next GEMM measured far dearer than idling them
// (Sapphire Rapids, 16 threads, 8-token step: 93.6 ms with teams sized to the
// 8 rows vs 26.7 ms for the whole step at 8 threads).
int rows_team(int N) {
  const int T = omp_get_max_threads();
  return (N <= 1 || T <= 1) ? 1 : T;
}

static float* row_scratch(int K) {
  thread_local std::vector<float> tmp;
  if (tmp.size() < (size_t)K) tmp.resize((size_t)K);
  return tmp.data();
}

// One parallel region over the rows of a fused op that needs a row of scratch;
// row(r, tmp) does row r.
template <class Row>
static void rows_with_scratch(int N, int K, Row&& row) {
  const int nt = rows_team(N);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* tmp = row_scratch(K);
#pragma omp for schedule(static)
    for (int r = 0; r < N; ++r) row(r, tmp);
  }
}

void add_norm_quant_rows(const SmallOps& t, float* x, const float* d, const float* w, int N, int K, float eps,
                         int8_t* q, float* scale, int32_t* sum, int Kp) {
  rows_with_scratch(N, K, [&](int r, float* tmp) {
    t.add_norm_quant(x + (int64_t)r * K, d ? d + (int64_t)r * K : nullptr, w, K, Kp, eps, tmp,
                     q + (int64_t)r * Kp, scale + r, sum + r);
  });
}

void act_norm_quant_rows(const SmallOps& t, float* g, const float* u, const float* w, int N, int K, float eps,
                         int8_t* q, float* scale, int32_t* sum, int Kp) {
  rows_with_scratch(N, K, [&](int r, float* tmp) {
    t.act_norm_quant(g + (int64_t)r * K, u + (int64_t)r * K, w, K, Kp, eps, tmp, q + (int64_t)r * Kp,
                     scale + r, sum + r);
  });
}

void rmsnorm_rows(const SmallOps& t, const float* x, const float* w, float* y, int N, int K, float eps) {
  for_rows(N, [&](int r) { t.rmsnorm(x + (int64_t)r * K, w, y + (int64_t)r * K, K, eps); });
}

}  // namespace bitdlm
