// Block-causal attention (portable code; the hot loops are in an AttnKernels table).
#include "model/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "model/half.h"
#include "model/isa_tables.h"

namespace bitdlm {

namespace portable {

static inline int round8(int n) { return (n + 7) & ~7; }

template <class T>
inline float ld(T x) {
  if constexpr (sizeof(T) == 2)
    return half_to_float(x);
  else
    return x;
}

template <class T>
static void k_tile(const T* K, int64_t ldk, int nk, int d, float* KT, int ldkt) {
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < nk; ++j) KT[(int64_t)i * ldkt + j] = ld(K[j * ldk + i]);
    for (int j = nk; j < round8(nk); ++j) KT[(int64_t)i * ldkt + j] = 0.f;
  }
}

static void v_tile_f16(const uint16_t* V, int64_t ldv, int nk, int d, float* Vf) {
  for (int j = 0; j < nk; ++j)
    for (int i = 0; i < d; ++i) Vf[(int64_t)j * d + i] = half_to_float(V[j * ldv + i]);
}

static void qk(const float* Q, int R, const float* KT, int ldkt, int nk, int d, float scale, float* S, int64_t lds) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < round8(nk); ++j) {
      float acc = 0.f;
      for (int i = 0; i < d; ++i) acc += Q[(int64_t)r * d + i] * KT[(int64_t)i * ldkt + j];
      S[r * lds + j] = acc * scale;
    }
}

static void softmax_tile(float* S, int64_t lds, int R, int n, float* m, float* l, float* O, int d) {
  for (int r = 0; r < R; ++r) {
    float* s = S + r * lds;
    float mx = m[r];
    for (int j = 0; j < n; ++j) mx = std::max(mx, s[j]);
    const float alpha = m[r] == -INFINITY ? 0.f : std::exp(m[r] - mx);
    float sum = 0.f;
    for (int j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    l[r] = l[r] * alpha + sum;
    m[r] = mx;
    if (alpha != 1.f)
      for (int i = 0; i < d; ++i) O[(int64_t)r * d + i] *= alpha;
  }
}

template <class T>
static void qk_direct(const float* Q, int R, const T* K, int64_t ldk, int nk, int d, float scale, float* S,
                      int64_t lds) {
  for (int j = 0; j < nk; ++j)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int i = 0; i < d; ++i) acc += Q[(int64_t)r * d + i] * ld(K[j * ldk + i]);
      S[r * lds + j] = acc * scale;
    }
}

template <class T>
static void pv(const float* P, int64_t ldp, int R, const T* V, int64_t ldv, int nk, int d, float* O) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < nk; ++j) {
      const float w = P[r * ldp + j];
      for (int i = 0; i < d; ++i) O[(int64_t)r * d + i] += w * ld(V[j * ldv + i]);
    }
}

static void to_f16(const float* x, uint16_t* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = f32_to_f16(x[i]);
}

}  // namespace portable

extern const AttnKernels kAttnPortable = {"portable",
                                          &portable::k_tile<float>,
                                          &portable::k_tile<uint16_t>,
                                          &portable::v_tile_f16,
                                          &portable::qk,
                                          &portable::qk_direct<float>,
                                          &portable::qk_direct<uint16_t>,
                                          &portable::softmax_tile,
                                          &portable::pv<float>,
                                          &portable::pv<uint16_t>,
                                          &portable::to_f16};

// `own` with its null entries taken from `base`.
static AttnKernels merged(const AttnKernels& own, const AttnKernels& base) {
  AttnKernels t = own;
  auto fill = [](auto& f, auto g) { if (!f) f = g; };
  fill(t.k_tile_f32, base.k_tile_f32);
  fill(t.k_tile_f16, base.k_tile_f16);
  fill(t.v_tile_f16, base.v_tile_f16);
  fill(t.qk, base.qk);
  fill(t.qk_direct_f32, base.qk_direct_f32);
  fill(t.qk_direct_f16, base.qk_direct_f16);
  fill(t.softmax_tile, base.softmax_tile);
  fill(t.pv_f32, base.pv_f32);
  fill(t.pv_f16, base.pv_f16);
  fill(t.to_f16, base.to_f16);
  return t;
}

const AttnKernels& attn_kernels(Isa isa) {
  // Follow the kernels' single dispatch point (re-read: _core.set_isa may change it);
  // levels without their own table use the best lower one.
  static const AttnKernels avx512 = merged(kAttnAvx512Own, kAttnAvx2);
  static const IsaTables<AttnKernels> tables{&kAttnPortable, &kAttnAvx2, &avx512};
  return tables[isa];
}

namespace {

// Keys visible to fresh query i of an item, in the order scores are laid out:
// cached [0, a1), cached [a2, a2 + nb), fresh [0, nf). Queries of one block
// share them, so a tile of queries is cut wherever they change.
struct Visible {
  int a1, a2, nb, nf;
  bool operator==(const Visible& o) const { return a1 == o.a1 && a2 == o.a2 && nb == o.nb && nf == o.nf; }
};

Visible visible(const AttnItem& it, int B, int i) {
  const int p = it.start + i;
  const int64_t block_end = ((int64_t)p / B + 1) * B;  // first position p must not see
  const int limit = (int)std::min<int64_t>(it.ctx_len, block_end);
  Visible v;
  v.a1 = std::min(limit, it.start);
  v.a2 = it.start + it.n;
  v.nb = std::max(0, limit - v.a2);
  v.nf = (int)std::min<int64_t>(it.n, block_end - it.start);
  return v;
}

struct Job {
  int item, kvh, i0, i1;  // fresh queries [i0, i1) of item, KV head kvh
};

constexpr int kQueriesPerJob = 8;

}  // namespace

// One job: rows R = (i1 - i0) queries x `group` heads against their common keys.
template <class T>
static void attend(const AttnKernels& kt, const AttnItem& it, const Visible& vis, int i0, int i1, int kvh,
                   int group, const float* q, const float* k, const float* v, int nh, int nkv, int hd, float* out,
                   float* Qs, float* Os, float* S, float* tile) {
  const int64_t ldq = (int64_t)nh * hd, ldkv = (int64_t)nkv * hd;
  const int R = (i1 - i0) * group;
  for (int i = i0; i < i1; ++i)
    std::memcpy(Qs + (int64_t)(i - i0) * group * hd, q + (int64_t)(it.row0 + i) * ldq + (int64_t)kvh * group * hd,
                sizeof(float) * group * hd);
  const T* Kc = static_cast<const T*>(it.kc) + (int64_t)kvh * it.cap * hd;
  const T* Vc = static_cast<const T*>(it.vc) + (int64_t)kvh * it.cap * hd;
  const float* Kf = k + (int64_t)it.row0 * ldkv + (int64_t)kvh * hd;
  const float* Vf = v + (int64_t)it.row0 * ldkv + (int64_t)kvh * hd;
  const float scale = 1.0f / std::sqrt((float)hd);
  // Key tile by key tile: scores (R x 64, in L1), online softmax, values; the
  // score rows over all keys are never stored. Few rows (decoding) read the
  // K/V rows directly, more rows go through converted / transposed tiles.
  const bool direct = R <= kAttnDirectRows;
  float* m = S + (int64_t)R * kAttnTile;
  float* l = m + R;
  for (int r = 0; r < R; ++r) m[r] = -INFINITY, l[r] = 0.f;
  std::memset(Os, 0, sizeof(float) * R * hd);
  auto seg = [&](const auto* K, const auto* V, int64_t ld, int nk) {
    constexpr bool f16 = sizeof(*K) == 2;
    for (int j0 = 0; j0 < nk; j0 += kAttnTile) {
      const int jt = std::min(kAttnTile, nk - j0);
      if (direct) {
        if constexpr (f16)
          kt.qk_direct_f16(Qs, R, K + j0 * ld, ld, jt, hd, scale, S, kAttnTile);
        else
          kt.qk_direct_f32(Qs, R, K + j0 * ld, ld, jt, hd, scale, S, kAttnTile);
      } else {
        if constexpr (f16)
          kt.k_tile_f16(K + j0 * ld, ld, jt, hd, tile, kAttnTile);
        else
          kt.k_tile_f32(K + j0 * ld, ld, jt, hd, tile, kAttnTile);
        kt.qk(Qs, R, tile, kAttnTile, jt, hd, scale, S, kAttnTile);
      }
      kt.softmax_tile(S, kAttnTile, R, jt, m, l, Os, hd);
      if constexpr (!f16) {
        kt.pv_f32(S, kAttnTile, R, V + j0 * ld, ld, jt, hd, Os);
      } else if (direct) {
        kt.pv_f16(S, kAttnTile, R, V + j0 * ld, ld, jt, hd, Os);
      } else {
        kt.v_tile_f16(V + j0 * ld, ld, jt, hd, tile);
        kt.pv_f32(S, kAttnTile, R, tile, hd, jt, hd, Os);
      }
    }
  };
  seg(Kc, Vc, hd, vis.a1);
  seg(Kc + (int64_t)vis.a2 * hd, Vc + (int64_t)vis.a2 * hd, hd, vis.nb);
  seg(Kf, Vf, ldkv, vis.nf);
  for (int r = 0; r < R; ++r) {
    const float inv = 1.0f / l[r];
    for (int i = 0; i < hd; ++i) Os[(int64_t)r * hd + i] *= inv;
  }
  for (int i = i0; i < i1; ++i)
    std::memcpy(out + (int64_t)(it.row0 + i) * ldq + (int64_t)kvh * group * hd, Os + (int64_t)(i - i0) * group * hd,
                sizeof(float) * group * hd);
}

void attention(bool kv_f16, const AttnItem* items, int n_items, int B, const float* q, const float* k,
               const float* v, int nh, int nkv, int hd, float* out, std::vector<float>& scratch) {
  const AttnKernels& kt = attn_kernels();
  const int group = nh / nkv;
  // Jobs: (item, KV head, up to kQueriesPerJob consecutive queries that see the same keys).
  std::vector<Job> jobs;
  std::vector<Visible> vis;
  for (int t = 0; t < n_items; ++t) {
    const AttnItem& it = items[t];
    for (int i0 = 0; i0 < it.n;) {
      const Visible v0 = visible(it, B, i0);
      int i1 = i0 + 1;
      while (i1 < it.n && i1 - i0 < kQueriesPerJob && visible(it, B, i1) == v0) ++i1;
      for (int h = 0; h < nkv; ++h) {
        jobs.push_back(Job{t, h, i0, i1});
        vis.push_back(v0);
      }
      i0 = i1;
    }
  }
  const int64_t rows = (int64_t)kQueriesPerJob * group;
  const int64_t s_size = rows * (kAttnTile + 2);  // one tile's scores, then the running max and sum per row
  const int64_t per_thread = rows * hd * 2 + s_size + (int64_t)kAttnTile * hd;
  const int nthreads = omp_get_max_threads();
  if (scratch.size() < (size_t)(nthreads * per_thread)) scratch.resize((size_t)(nthreads * per_thread));
  float* sbase = scratch.data();
  const int64_t njobs = (int64_t)jobs.size();
#pragma omp parallel for schedule(dynamic, 1) if (njobs > 1)
  for (int64_t j = 0; j < njobs; ++j) {
    float* Qs = sbase + (int64_t)omp_get_thread_num() * per_thread;
    float* Os = Qs + rows * hd;
    float* S = Os + rows * hd;
    float* tile = S + s_size;
    const Job& jb = jobs[j];
    if (kv_f16)
      attend<uint16_t>(kt, items[jb.item], vis[j], jb.i0, jb.i1, jb.kvh, group, q, k, v, nh, nkv, hd, out, Qs, Os,
                       S, tile);
    else
      attend<float>(kt, items[jb.item], vis[j], jb.i0, jb.i1, jb.kvh, group, q, k, v, nh, nkv, hd, out, Qs, Os, S,
                    tile);
  }
}

}  // namespace bitdlm
