// The one dispatch point: picks a kernel table from cpuid, overridable with
// BITDLM_ISA=scalar|avx2|avx512. Compiled WITHOUT ISA flags.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/isa.h"

namespace bitdlm {

static const KernelTable* pick_table() {
  const char* env = std::getenv("BITDLM_ISA");
  if (env && *env) {
    if (std::strcmp(env, "scalar") == 0) return &kScalarKernels;
    throw std::runtime_error(std::string("BITDLM_ISA=") + env + " is not available on this CPU/build");
  }
  return &kScalarKernels;
}

static const KernelTable& table() {
  static const KernelTable* t = pick_table();
  return *t;
}

const char* active_isa() { return table().name; }

void quantize_act(const float* x, int N, int K, int Kp, int8_t* q, float* scale, int32_t* sum) {
  for (int n = 0; n < N; ++n) {
    const float* xr = x + (int64_t)n * K;
    int8_t* qr = q + (int64_t)n * Kp;
    float amax = 0.f;
    for (int k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(xr[k]));
    const float s = 127.0f / std::fmax(amax, 1e-5f);
    int32_t acc = 0;
    for (int k = 0; k < K; ++k) {
      // nearbyintf: round half to even like torch.round (std::round is half away).
      float r = std::nearbyintf(xr[k] * s);
      r = std::fmin(std::fmax(r, -128.f), 127.f);
      qr[k] = (int8_t)r;
      acc += qr[k];
    }
    for (int k = K; k < Kp; ++k) qr[k] = 0;
    scale[n] = s;
    sum[n] = acc;
  }
}

void gemm_i2_i8(const TernaryW* ws, int n_ws, const ActQ& a) {
  const KernelTable& t = table();
  constexpr int kRowTile = 16;
  int64_t total = 0;
  for (int i = 0; i < n_ws; ++i) total += (ws[i].M + kRowTile - 1) / kRowTile;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < total; ++job) {
    int64_t j = job;
    int i = 0;
    while (j >= (ws[i].M + kRowTile - 1) / kRowTile) j -= (ws[i].M + kRowTile - 1) / kRowTile, ++i;
    const int m0 = (int)j * kRowTile;
    const int m1 = std::min(ws[i].M, m0 + kRowTile);
    t.gemm_rows(ws[i], a, m0, m1);
  }
}

void gemm_i2_i8_i32(const uint8_t* W, int M, const ActQ& a, int32_t* out) {
  TernaryW w{W, M, 1.f, nullptr, 0};
  table().gemm_rows_i32(w, a, 0, M, out);
}

}  // namespace bitdlm
