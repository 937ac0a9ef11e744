// Block-causal attention (portable code; the hot loops are in an AttnKernels table).
#include "model/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/gemm.h"
#include "model/half.h"

namespace bitdlm {

namespace portable {

template <class T>
inline float ld(T x) {
  if constexpr (sizeof(T) == 2)
    return f16_to_f32(x);
  else
    return x;
}

template <class T>
static void scores(const float* q, int64_t ldq, int nq, const T* K, int64_t ldk, int nk, int d, float scale,
                   float* out, int64_t ldo) {
  for (int j = 0; j < nk; ++j) {
    const T* kr = K + j * ldk;
    for (int h = 0; h < nq; ++h) {
      const float* qh = q + h * ldq;
      float acc = 0.f;
      for (int i = 0; i < d; ++i) acc += qh[i] * ld(kr[i]);
      out[h * ldo + j] = acc * scale;
    }
  }
}

template <class T>
static void accum(const float* p, int64_t ldp, int nq, const T* V, int64_t ldv, int nk, int d, float* out,
                  int64_t ldout) {
  for (int j = 0; j < nk; ++j) {
    const T* vr = V + j * ldv;
    for (int h = 0; h < nq; ++h) {
      const float w = p[h * ldp + j];
      float* o = out + h * ldout;
      for (int i = 0; i < d; ++i) o[i] += w * ld(vr[i]);
    }
  }
}

static void to_f16(const float* x, uint16_t* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = f32_to_f16(x[i]);
}

}  // namespace portable

extern const AttnKernels kAttnPortable = {"portable", &portable::scores<float>, &portable::scores<uint16_t>,
                                          &portable::accum<float>, &portable::accum<uint16_t>,
                                          &portable::to_f16};

const AttnKernels& attn_kernels() {
  // Follow the kernels' single dispatch point (re-read: _core.set_isa may change it);
  // every ISA above scalar has AVX2.
  return std::strcmp(active_isa(), "scalar") == 0 ? kAttnPortable : kAttnAvx2;
}

// Query i of item `it` for the `group` query heads of KV head kvh.
template <class T>
static void attend_group(const AttnKernels& kt, const AttnItem& it, int B, int i, int kvh, int group,
                         const float* q, const float* k, const float* v, int nh, int nkv, int hd, float* out,
                         float* s, int64_t lds) {
  const int64_t ldq = (int64_t)nh * hd, ldkv = (int64_t)nkv * hd;
  const int p = it.start + i;
  const int64_t block_end = ((int64_t)p / B + 1) * B;  // first position p must not see
  const int limit = (int)std::min<int64_t>(it.ctx_len, block_end);
  // Visible keys: cached [0, a1), cached [a2, limit), fresh [0, nf).
  const int a1 = std::min(limit, it.start);
  const int a2 = it.start + it.n;
  const int nb = std::max(0, limit - a2);
  const int nf = (int)std::min<int64_t>(it.n, block_end - it.start);
  const int tot = a1 + nb + nf;
  const float scale = 1.0f / std::sqrt((float)hd);
  const float* qr = q + (int64_t)(it.row0 + i) * ldq + (int64_t)kvh * group * hd;
  float* o = out + (int64_t)(it.row0 + i) * ldq + (int64_t)kvh * group * hd;
  const T* K = static_cast<const T*>(it.kc) + (int64_t)kvh * it.cap * hd;
  const T* V = static_cast<const T*>(it.vc) + (int64_t)kvh * it.cap * hd;
  const float* Kf = k + (int64_t)it.row0 * ldkv + (int64_t)kvh * hd;
  const float* Vf = v + (int64_t)it.row0 * ldkv + (int64_t)kvh * hd;
  auto scores = [&](const T* K_, int64_t ld, int nk, float* so) {
    if constexpr (sizeof(T) == 2)
      kt.scores_f16(qr, hd, group, K_, ld, nk, hd, scale, so, lds);
    else
      kt.scores_f32(qr, hd, group, K_, ld, nk, hd, scale, so, lds);
  };
  auto accum = [&](const float* pr, const T* V_, int64_t ld, int nk) {
    if constexpr (sizeof(T) == 2)
      kt.accum_f16(pr, lds, group, V_, ld, nk, hd, o, hd);
    else
      kt.accum_f32(pr, lds, group, V_, ld, nk, hd, o, hd);
  };
  if (a1 > 0) scores(K, hd, a1, s);
  if (nb > 0) scores(K + (int64_t)a2 * hd, hd, nb, s + a1);
  kt.scores_f32(qr, hd, group, Kf, ldkv, nf, hd, scale, s + a1 + nb, lds);
  // Stable softmax per head (row h of s).
  for (int h = 0; h < group; ++h) {
    float* sh = s + h * lds;
    float mx = -INFINITY;
    for (int j = 0; j < tot; ++j) mx = std::max(mx, sh[j]);
    float sum = 0.f;
    for (int j = 0; j < tot; ++j) {
      sh[j] = std::exp(sh[j] - mx);
      sum += sh[j];
    }
    const float inv = 1.0f / sum;
    for (int j = 0; j < tot; ++j) sh[j] *= inv;
  }
  std::memset(o, 0, sizeof(float) * hd * group);
  if (a1 > 0) accum(s, V, hd, a1);
  if (nb > 0) accum(s + a1, V + (int64_t)a2 * hd, hd, nb);
  kt.accum_f32(s + a1 + nb, lds, group, Vf, ldkv, nf, hd, o, hd);
}

void attention(bool kv_f16, const AttnItem* items, int n_items, int B, const float* q, const float* k,
               const float* v, int nh, int nkv, int hd, float* out, std::vector<float>& scratch) {
  const AttnKernels& kt = attn_kernels();
  const int group = nh / nkv;
  int max_keys = 1;
  for (int t = 0; t < n_items; ++t) {
    max_keys = std::max(max_keys, std::max(items[t].ctx_len, items[t].start) + items[t].n);
  }
  const int nthreads = omp_get_max_threads();
  const int64_t lds = max_keys;  // score rows of one thread: [group, max_keys]
  const size_t per_thread = (size_t)group * max_keys;
  if (scratch.size() < (size_t)nthreads * per_thread) scratch.resize((size_t)nthreads * per_thread);
  // Jobs are (item, KV head, query) triples, queries fastest.
  std::vector<int64_t> first(n_items + 1, 0);
  for (int t = 0; t < n_items; ++t) first[t + 1] = first[t] + (int64_t)items[t].n * nkv;
  const int64_t jobs = first[n_items];
  float* sbase = scratch.data();
#pragma omp parallel for schedule(static) if (jobs > 1)
  for (int64_t job = 0; job < jobs; ++job) {
    const int t = (int)(std::upper_bound(first.begin(), first.end(), job) - first.begin()) - 1;
    const int64_t r = job - first[t];
    const int g = (int)(r / items[t].n), i = (int)(r % items[t].n);
    float* s = sbase + (size_t)omp_get_thread_num() * per_thread;
    if (kv_f16)
      attend_group<uint16_t>(kt, items[t], B, i, g, group, q, k, v, nh, nkv, hd, out, s, lds);
    else
      attend_group<float>(kt, items[t], B, i, g, group, q, k, v, nh, nkv, hd, out, s, lds);
  }
}

}  // namespace bitdlm
