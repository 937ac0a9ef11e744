// The baseline (scalar) small-op table, the table array and the row drivers.
#define SMALLOPS_NS scalar
#define SMALLOPS_TABLE kSmallOpsScalar
#define SMALLOPS_NAME "scalar"
#include "model/smallops.inc"

#include <omp.h>

#include <vector>

#include "model/isa_tables.h"

namespace bitdlm {

const SmallOps& small_ops(Isa isa) {
  // AVX-512 VNNI and AMX add nothing these ops use: they take the AVX-512 table.
  static const IsaTables<SmallOps> tables{&kSmallOpsScalar, &kSmallOpsAvx2, &kSmallOpsAvx512};
  return tables[isa];
}

// One parallel region per fused op; each thread keeps one row of scratch.
// Rows are handed out dynamically: on a shared machine a descheduled thread
// then delays the region by one row, not its static share (see dispatch.cpp).
void add_norm_quant_rows(const SmallOps& t, float* x, const float* d, const float* w, int N, int K, float eps,
                         int8_t* q, float* scale, int32_t* sum, int Kp) {
#pragma omp parallel if (N > 1)
  {
    std::vector<float> tmp(K);
#pragma omp for schedule(dynamic, 1)
    for (int r = 0; r < N; ++r)
      t.add_norm_quant(x + (int64_t)r * K, d ? d + (int64_t)r * K : nullptr, w, K, Kp, eps, tmp.data(),
                       q + (int64_t)r * Kp, scale + r, sum + r);
  }
}

void act_norm_quant_rows(const SmallOps& t, float* g, const float* u, const float* w, int N, int K, float eps,
                         int8_t* q, float* scale, int32_t* sum, int Kp) {
#pragma omp parallel if (N > 1)
  {
    std::vector<float> tmp(K);
#pragma omp for schedule(dynamic, 1)
    for (int r = 0; r < N; ++r)
      t.act_norm_quant(g + (int64_t)r * K, u + (int64_t)r * K, w, K, Kp, eps, tmp.data(), q + (int64_t)r * Kp,
                       scale + r, sum + r);
  }
}

void rmsnorm_rows(const SmallOps& t, const float* x, const float* w, float* y, int N, int K, float eps) {
#pragma omp parallel for schedule(dynamic, 1) if (N > 1)
  for (int r = 0; r < N; ++r) t.rmsnorm(x + (int64_t)r * K, w, y + (int64_t)r * K, K, eps);
}

}  // namespace bitdlm
