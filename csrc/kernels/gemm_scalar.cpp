// Scalar reference kernels: the definition every SIMD kernel is tested against.
#include "kernels/isa.h"

namespace bitdlm {
namespace scalar {

static void tile(const TernaryW& w, const ActQ& a, int m0, int m1, int32_t* raw, bool to_float) {
  const int kb = a.Kp / 4;
  for (int m = m0; m < m1; ++m) {
    const uint8_t* row = w.data + (int64_t)m * kb;
    for (int n = 0; n < a.N; ++n) {
      const int8_t* q = a.q + (int64_t)n * a.Kp;
      int32_t acc = 0;
      for (int b = 0; b < a.Kp / kKBlock; ++b)
        for (int j = 0; j < 32; ++j) {
          const uint8_t v = row[b * 32 + j];
          for (int i = 0; i < 4; ++i)
            acc += (int32_t)((v >> (2 * i)) & 3) * q[b * kKBlock + 32 * i + j];
        }
      acc -= a.sum[n];
      if (to_float)
        w.y[(int64_t)n * w.ldy + m] = (float)acc / (w.scale * a.scale[n]);
      else
        raw[(int64_t)n * w.M + m] = acc;
    }
  }
}

static void gemm_rows(const TernaryW& w, const ActQ& a, int m0, int m1) { tile(w, a, m0, m1, nullptr, true); }
static void gemm_rows_i32(const TernaryW& w, const ActQ& a, int m0, int m1, int32_t* out) {
  tile(w, a, m0, m1, out, false);
}

}  // namespace scalar

extern const KernelTable kScalarKernels = {"scalar", &scalar::gemm_rows, &scalar::gemm_rows_i32};

}  // namespace bitdlm
