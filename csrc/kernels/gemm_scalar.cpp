// Scalar reference kernels: the definition every SIMD kernel is tested against.
#include <cmath>

#include "kernels/epilogue.h"
#include "kernels/isa.h"

namespace bitdlm {
namespace scalar {

static void ternary(const TernaryW& w, const ActQ& a, int m0, int m1, int n0, int n1, int32_t* out) {
  const int kb = a.Kp / 4;
  for (int m = m0; m < m1; ++m) {
    const uint8_t* row = w.data + (int64_t)m * kb;
    for (int n = n0; n < n1; ++n) {
      const int8_t* q = a.q + (int64_t)n * a.Kp;
      int32_t acc = 0;
      for (int b = 0; b < a.Kp / kKBlock; ++b)
        for (int j = 0; j < 32; ++j) {
          const uint8_t v = row[b * 32 + j];
          for (int i = 0; i < 4; ++i) acc += (int32_t)((v >> (2 * i)) & 3) * q[b * kKBlock + 32 * i + j];
        }
      ternary_out(w, a, m, n, acc - a.sum[n], out);
    }
  }
}

static void f16(const uint16_t* W, int K, const float* x, int N, float* y, int ldy, int m0, int m1) {
  for (int m = m0; m < m1; ++m) {
    const uint16_t* wr = W + (int64_t)m * K;
    for (int n = 0; n < N; ++n) {
      const float* xr = x + (int64_t)n * K;
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += half_to_float(wr[k]) * xr[k];
      y[(int64_t)n * ldy + m] = acc;
    }
  }
}

static void i8(const int8_t* W, const float* wscale, int K, const ActQ& a, float* y, int ldy, int m0, int m1) {
  for (int m = m0; m < m1; ++m) {
    const int8_t* wr = W + (int64_t)m * K;
    for (int n = 0; n < a.N; ++n) {
      const int8_t* q = a.q + (int64_t)n * a.Kp;
      int32_t acc = 0;
      for (int k = 0; k < K; ++k) acc += (int32_t)wr[k] * q[k];
      i8_out(wscale, a, y, ldy, m, n, acc);
    }
  }
}

static void quantize(const float* x, int N, int K, int Kp, int8_t* q, float* scale, int32_t* sum) {
  for (int n = 0; n < N; ++n) {
    const float* xr = x + (int64_t)n * K;
    int8_t* qr = q + (int64_t)n * Kp;
    float amax = 0.f;
    for (int k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(xr[k]));
    const float s = (1.0f / std::fmax(amax, 1e-5f)) * 127.0f;  // as torch rounds 127 / amax (smallops.inc)
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

}  // namespace scalar

extern const KernelTable kScalarKernels = {&scalar::ternary, &scalar::f16, &scalar::i8, &scalar::quantize, nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace bitdlm
