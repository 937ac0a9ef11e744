// Attention hot loops with NEON (aarch64 baseline: Advanced SIMD and the
// fp16 <-> fp32 conversions FCVTL / FCVTN are part of ARMv8-A, so this file
// needs no -march flag and serves every ARM level). fp16 K/V rows are
// converted 4 at a time by FCVTL instead of the portable bit manipulation;
// scores and values are 4-lane FMA loops; the online softmax takes
// simd_neon.h's exp (the AVX2 softmax's algorithm).
#include <arm_neon.h>

#include <cmath>

#include "kernels/isa.h"
#include "model/attention.h"
#include "model/half.h"
#include "model/simd_neon.h"

namespace bitdlm {
namespace neon {

static inline int round8(int n) { return (n + 7) & ~7; }

static inline float32x4_t load4(const float* p) { return vld1q_f32(p); }
static inline float32x4_t load4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) { return half_to_float(*p); }

// KT[i * ldkt + j] = K[j * ld + i]: 4 keys x 4 dims per step (converted, then
// transposed in registers), tails one value at a time; columns nk..round8(nk) zero.
template <class T>
static void k_tile(const T* K, int64_t ld, int nk, int d, float* KT, int ldkt) {
  int j = 0;
  for (; j + 4 <= nk; j += 4) {
    int i = 0;
    for (; i + 4 <= d; i += 4) {
      const float32x4_t r0 = load4(K + j * ld + i), r1 = load4(K + (j + 1) * ld + i);
      const float32x4_t r2 = load4(K + (j + 2) * ld + i), r3 = load4(K + (j + 3) * ld + i);
      const float32x4_t t0 = vtrn1q_f32(r0, r1), t1 = vtrn2q_f32(r0, r1);
      const float32x4_t t2 = vtrn1q_f32(r2, r3), t3 = vtrn2q_f32(r2, r3);
      float* o = KT + (int64_t)i * ldkt + j;
      vst1q_f32(o, vreinterpretq_f32_f64(vzip1q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2))));
      vst1q_f32(o + ldkt, vreinterpretq_f32_f64(vzip1q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3))));
      vst1q_f32(o + 2 * ldkt, vreinterpretq_f32_f64(vzip2q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2))));
      vst1q_f32(o + 3 * ldkt, vreinterpretq_f32_f64(vzip2q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3))));
    }
    for (; i < d; ++i)
      for (int jj = j; jj < j + 4; ++jj) KT[(int64_t)i * ldkt + jj] = load1(K + jj * ld + i);
  }
  for (; j < nk; ++j)
    for (int i = 0; i < d; ++i) KT[(int64_t)i * ldkt + j] = load1(K + j * ld + i);
  for (int i = 0; i < d; ++i)
    for (int jj = nk; jj < round8(nk); ++jj) KT[(int64_t)i * ldkt + jj] = 0.f;
}

static void v_tile_f16(const uint16_t* V, int64_t ld, int nk, int d, float* Vf) {
  for (int j = 0; j < nk; ++j) {
    int i = 0;
    for (; i + 4 <= d; i += 4) vst1q_f32(Vf + (int64_t)j * d + i, load4(V + j * ld + i));
    for (; i < d; ++i) Vf[(int64_t)j * d + i] = half_to_float(V[j * ld + i]);
  }
}

// Scores of R rows x round8(nk) keys from the transposed tile: 4 rows x 8 keys
// (8 accumulators) per step, each KT row loaded once for the 4 rows.
static void qk(const float* Q, int R, const float* KT, int ldkt, int nk, int d, float scale, float* S, int64_t lds) {
  const int nj = round8(nk);
  int r = 0;
  for (; r + 4 <= R; r += 4)
    for (int j = 0; j < nj; j += 8) {
      float32x4_t a[4][2];
      for (int x = 0; x < 4; ++x) a[x][0] = a[x][1] = vdupq_n_f32(0.f);
      for (int i = 0; i < d; ++i) {
        const float32x4_t k0 = vld1q_f32(KT + (int64_t)i * ldkt + j), k1 = vld1q_f32(KT + (int64_t)i * ldkt + j + 4);
        for (int x = 0; x < 4; ++x) {
          const float q = Q[(int64_t)(r + x) * d + i];
          a[x][0] = vfmaq_n_f32(a[x][0], k0, q);
          a[x][1] = vfmaq_n_f32(a[x][1], k1, q);
        }
      }
      for (int x = 0; x < 4; ++x) {
        vst1q_f32(S + (r + x) * lds + j, vmulq_n_f32(a[x][0], scale));
        vst1q_f32(S + (r + x) * lds + j + 4, vmulq_n_f32(a[x][1], scale));
      }
    }
  for (; r < R; ++r)
    for (int j = 0; j < nj; j += 8) {
      float32x4_t a0 = vdupq_n_f32(0.f), a1 = a0;
      for (int i = 0; i < d; ++i) {
        const float q = Q[(int64_t)r * d + i];
        a0 = vfmaq_n_f32(a0, vld1q_f32(KT + (int64_t)i * ldkt + j), q);
        a1 = vfmaq_n_f32(a1, vld1q_f32(KT + (int64_t)i * ldkt + j + 4), q);
      }
      vst1q_f32(S + r * lds + j, vmulq_n_f32(a0, scale));
      vst1q_f32(S + r * lds + j + 4, vmulq_n_f32(a1, scale));
    }
}

// Scores straight from K rows (R <= 4 rows: decoding): each key row is loaded
// and converted once for the R rows.
template <class T>
static void qk_direct(const float* Q, int R, const T* K, int64_t ld, int nk, int d, float scale, float* S,
                      int64_t lds) {
  for (int j = 0; j < nk; ++j) {
    const T* kr = K + j * ld;
    for (int r0 = 0; r0 < R; r0 += 4) {
      const int rn = R - r0 < 4 ? R - r0 : 4;
      float32x4_t a[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
      int i = 0;
      for (; i + 4 <= d; i += 4) {
        const float32x4_t k = load4(kr + i);
        for (int x = 0; x < rn; ++x) a[x] = vfmaq_f32(a[x], vld1q_f32(Q + (int64_t)(r0 + x) * d + i), k);
      }
      for (int x = 0; x < rn; ++x) {
        float acc = vaddvq_f32(a[x]);
        for (int ii = i; ii < d; ++ii) acc += Q[(int64_t)(r0 + x) * d + ii] * load1(kr + ii);
        S[(r0 + x) * lds + j] = acc * scale;
      }
    }
  }
}

// O[r] += sum_j P[r, j] V[j]: per row, 16 output dims in registers over all keys.
template <class T>
static void pv(const float* P, int64_t ldp, int R, const T* V, int64_t ldv, int nk, int d, float* O) {
  for (int r = 0; r < R; ++r) {
    float* o = O + (int64_t)r * d;
    const float* p = P + r * ldp;
    int i = 0;
    for (; i + 16 <= d; i += 16) {
      float32x4_t a0 = vld1q_f32(o + i), a1 = vld1q_f32(o + i + 4), a2 = vld1q_f32(o + i + 8),
                  a3 = vld1q_f32(o + i + 12);
      for (int j = 0; j < nk; ++j) {
        const T* v = V + j * ldv + i;
        a0 = vfmaq_n_f32(a0, load4(v), p[j]);
        a1 = vfmaq_n_f32(a1, load4(v + 4), p[j]);
        a2 = vfmaq_n_f32(a2, load4(v + 8), p[j]);
        a3 = vfmaq_n_f32(a3, load4(v + 12), p[j]);
      }
      vst1q_f32(o + i, a0), vst1q_f32(o + i + 4, a1), vst1q_f32(o + i + 8, a2), vst1q_f32(o + i + 12, a3);
    }
    for (; i + 4 <= d; i += 4) {
      float32x4_t a = vld1q_f32(o + i);
      for (int j = 0; j < nk; ++j) a = vfmaq_n_f32(a, load4(V + j * ldv + i), p[j]);
      vst1q_f32(o + i, a);
    }
    for (; i < d; ++i)
      for (int j = 0; j < nk; ++j) o[i] += p[j] * load1(V + j * ldv + i);
  }
}

// s[j] = exp(s[j] - mx) for j < n; returns their sum. Not inlined: inside
// softmax_tile's row loop GCC reloaded exp_neg's 10 constants every 4 scores
// (49 instructions per trip instead of 32).
__attribute__((noinline)) static float exp_sum(float* s, int n, float mx) {
  const float32x4_t vmx = vdupq_n_f32(mx);
  float32x4_t vs = vdupq_n_f32(0.f);
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const float32x4_t e = exp_neg(vsubq_f32(vld1q_f32(s + j), vmx));
    vst1q_f32(s + j, e);
    vs = vaddq_f32(vs, e);
  }
  float sum = vaddvq_f32(vs);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  return sum;
}

static inline void scale_row(float* o, int d, float alpha) {
  int i = 0;
  for (; i + 4 <= d; i += 4) vst1q_f32(o + i, vmulq_n_f32(vld1q_f32(o + i), alpha));
  for (; i < d; ++i) o[i] *= alpha;
}

// softmax_tile, 4 lanes at a time
#include "model/softmax_tile.inc"

// fp32 -> fp16 with FCVTN (round to nearest even, like f32_to_f16).
static void to_f16(const float* x, uint16_t* y, int n) {
  int i = 0;
  for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
  for (; i < n; ++i) y[i] = f32_to_f16(x[i]);
}

}  // namespace neon

extern const AttnKernels kAttnNeon = {&neon::k_tile<float>,
                                      &neon::k_tile<uint16_t>,
                                      &neon::v_tile_f16,
                                      &neon::qk,
                                      &neon::qk_direct<float>,
                                      &neon::qk_direct<uint16_t>,
                                      &neon::softmax_tile,
                                      &neon::pv<float>,
                                      &neon::pv<uint16_t>,
                                      &neon::to_f16,
                                      nullptr,  // seg_lanes_f32: the row-major tiled path
                                      nullptr,
                                      nullptr,
                                      nullptr,
                                      nullptr};

}  // namespace bitdlm
