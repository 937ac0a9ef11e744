// Block-causal attention (portable code; the hot loops are in an AttnKernels table).
#include "model/attention.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <cmath>
#include <cstring>

#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "model/half.h"
#include "kernels/isa_table.h"
#include "kernels/job_ranges.h"
#include "kernels/team_clock.h"

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

extern const AttnKernels kAttnPortable = {&portable::k_tile<float>,
                                          &portable::k_tile<uint16_t>,
                                          &portable::v_tile_f16,
                                          &portable::qk,
                                          &portable::qk_direct<float>,
                                          &portable::qk_direct<uint16_t>,
                                          &portable::softmax_tile,
                                          &portable::pv<float>,
                                          &portable::pv<uint16_t>,
                                          &portable::to_f16,
                                          nullptr,  // seg_lanes_f32: the row-major tiled path
                                          nullptr,
                                          nullptr,
                                          nullptr,
                                          nullptr};

const AttnKernels& attn_kernels(Isa isa) {
  static const IsaTable<AttnKernels> tables{
      {Isa::kScalar, &kAttnPortable},
#if defined(__x86_64__)
      {Isa::kAvx2, &kAttnAvx2},
      {Isa::kAvx512, &kAttnAvx512Own},
#elif defined(__aarch64__)
      {Isa::kNeon, &kAttnNeon},
#endif
  };
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
  int causal;             // -1, or where its queries' fresh key counts start (attention(): causal_nf)
};

// A unit of parallel work: keys [k0, k1) of a job, counted over its visible
// keys in score order (cached [0, a1), cached after the block, fresh). A job
// cut into several units (flash-decoding) leaves each unit's running max, sum
// and unnormalized output in `slot`; the unit that finishes last merges them.
struct Unit {
  int job, k0, k1;
  int64_t slot;  // offset of this unit's partial in the partial area, -1: the job is not split
};

constexpr int kQueriesPerJob = 8;
// A job's keys are cut into units whose size depends on the job and its item
// alone (never on the thread count or the other items of the batch) and whose
// partials merge in key order: the output is bit-identical for any team size
// and batch. Decoding rows: 64-key units (bandwidth-bound, the more the
// better). Tiled rows: about kUnitsPerItem units per item, at least 64 keys
// each: 8 queries x 544 keys -> 5 KV heads x 9 units, 32 queries -> 20 jobs x 3
// units of 192 (704 at 2048 cached) -- the cuts the thread-dependent split made
// at 16 threads on Sapphire Rapids. Uniform 64-key units measured slower there
// for 32 queries (7.9 vs 6.7 ms per 30 layers at 512 cached, 27.5 vs 20.3 ms at
// 2048: 3-11 MB of partials per layer).
constexpr int kUnitKeys = 64, kUnitsPerItem = 64;

}  // namespace

static inline int round16(int n) { return (n + 15) & ~15; }

// f(K, V, ld, nk, first) for the part of keys [k0, k1) in each segment of a job's
// visible keys, in key order: cached keys before the current block [0, a1),
// the block's cached keys [a2, a2 + nb), then this call's fresh rows (nf).
template <class T, class F>
static void for_key_segments(const AttnItem& it, const Visible& vis, int kvh, int k0, int k1, const float* k,
                             const float* v, int nkv, int hd, F&& f) {
  const int64_t ldkv = (int64_t)nkv * hd;
  const T* Kc = static_cast<const T*>(it.kc) + (int64_t)kvh * it.cap * hd;
  const T* Vc = static_cast<const T*>(it.vc) + (int64_t)kvh * it.cap * hd;
  auto clip = [&](const auto* K, const auto* V, int64_t ld, int nk, int off) {
    const int lo = std::max(k0 - off, 0), hi = std::min(k1 - off, nk);
    if (lo < hi) f(K + lo * ld, V + lo * ld, ld, hi - lo, off + lo);
  };
  clip(Kc, Vc, hd, vis.a1, 0);
  clip(Kc + (int64_t)vis.a2 * hd, Vc + (int64_t)vis.a2 * hd, hd, vis.nb, vis.a1);
  clip(k + (int64_t)it.row0 * ldkv + (int64_t)kvh * hd, v + (int64_t)it.row0 * ldkv + (int64_t)kvh * hd, ldkv, vis.nf,
       vis.a1 + vis.nb);
}

// The tiled path of a table with rows in lanes (AttnKernels::seg_lanes_*): the
// same unit as attend() below, with the rows transposed into vector lanes
// (Rp = R rounded up to 16; padding rows are zero queries, dropped at the end),
// so the scores of a key are one row of ST and the softmax runs across rows.
// nfq (null: every query of the job sees vis.nf fresh keys): each query's own fresh keys, for a
// causal job (block size 1: each query sees one fresh key more than the one before).
template <class T>
static void attend_lanes(const AttnKernels& kt, const AttnItem& it, const Visible& vis, int i0, int i1, int kvh,
                         int group, int k0, int k1, const float* q, const float* k, const float* v, int nh, int nkv,
                         int hd, float* out, float* part, const float* qt, float* QT, float* OT, float* S,
                         float* tile, const int* nfq) {
  const int64_t ldq = (int64_t)nh * hd;
  const int R = (i1 - i0) * group, Rp = round16(R);
  const int64_t qoff = (int64_t)(it.row0 + i0) * ldq + (int64_t)kvh * group * hd;  // row 0: query i0, head kvh * group
  if (qt)  // the job's queries, transposed once for all its units
    QT = const_cast<float*>(qt);
  else
    kt.to_lanes(q + qoff, ldq, group, R, hd, QT, Rp);
  // a split job's unit keeps its state in its slot, [OT | m | l] (merge_lanes' layout)
  if (part) OT = part;
  float* m = part ? part + (int64_t)Rp * hd : S + (int64_t)Rp * kAttnTile;
  float* l = m + Rp;
  for (int r = 0; r < Rp; ++r) m[r] = -INFINITY, l[r] = 0.f;  // OT: unread while m = -inf (seg_lanes_*)
  const float scale = 1.0f / std::sqrt((float)hd);
  // a causal job's fresh keys: row r (query i0 + r / group) sees those before its own limit
  thread_local std::vector<float> lim_buf;
  const int fresh0 = vis.a1 + vis.nb;  // the fresh segment's first key in the job's key order
  for_key_segments<T>(it, vis, kvh, k0, k1, k, v, nkv, hd,
                      [&](const auto* K, const auto* V, int64_t ld, int nk, int first) {
    const float* lim = nullptr;
    if (nfq && first >= fresh0) {
      lim_buf.resize(Rp);
      for (int r = 0; r < Rp; ++r)  // (padding rows: every key)
        lim_buf[r] = r < R ? (float)(nfq[r / group] - (first - fresh0)) : (float)nk;
      lim = lim_buf.data();
    }
    if constexpr (sizeof(*K) == 2)
      kt.seg_lanes_f16(QT, Rp, K, V, ld, nk, hd, scale, m, l, OT, S, tile, lim);
    else
      kt.seg_lanes_f32(QT, Rp, K, V, ld, nk, hd, scale, m, l, OT, S, tile, lim);
  });
  if (part) return;
  for (int r = 0; r < R; ++r) l[r] = 1.0f / l[r];
  kt.from_lanes(OT, Rp, R, hd, l, out + qoff, ldq, group);
}

// Rows R = (i1 - i0) queries x `group` heads against keys [k0, k1) of their
// common visible keys. With `part` null the output is normalized and written
// to `out`; otherwise part = [R * hd unnormalized output | R running max | R sum].
template <class T>
static void attend(const AttnKernels& kt, const AttnItem& it, const Visible& vis, int i0, int i1, int kvh,
                   int group, int k0, int k1, const float* q, const float* k, const float* v, int nh, int nkv,
                   int hd, float* out, float* part, const float* qt, float* Qs, float* Os, float* S, float* tile,
                   const int* nfq) {
  const int64_t ldq = (int64_t)nh * hd;
  const int R = (i1 - i0) * group;
  // Key tile by key tile: scores (R x 64, in L1), online softmax, values; the
  // score rows over all keys are never stored. Few rows (decoding) read the
  // K/V rows directly, more rows go through converted / transposed tiles.
  const bool direct = R <= kAttnDirectRows;
  if (!direct && kt.seg_lanes_f16) {  // (it reads Q itself, transposed)
    attend_lanes<T>(kt, it, vis, i0, i1, kvh, group, k0, k1, q, k, v, nh, nkv, hd, out, part, qt, Qs, Os, S, tile,
                    nfq);
    return;
  }
  for (int i = i0; i < i1; ++i)
    std::memcpy(Qs + (int64_t)(i - i0) * group * hd, q + (int64_t)(it.row0 + i) * ldq + (int64_t)kvh * group * hd,
                sizeof(float) * group * hd);
  const float scale = 1.0f / std::sqrt((float)hd);
  if (part) Os = part;
  float* m = part ? part + (int64_t)R * hd : S + (int64_t)R * kAttnTile;
  float* l = m + R;
  for (int r = 0; r < R; ++r) m[r] = -INFINITY, l[r] = 0.f;
  std::memset(Os, 0, sizeof(float) * R * hd);
  auto seg = [&](const auto* K, const auto* V, int64_t ld, int nk, int) {  // (never a causal job: see attention())
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
  for_key_segments<T>(it, vis, kvh, k0, k1, k, v, nkv, hd, seg);
  if (part) return;
  for (int r = 0; r < R; ++r) {
    const float inv = 1.0f / l[r];
    for (int i = 0; i < hd; ++i) Os[(int64_t)r * hd + i] *= inv;
  }
  for (int i = i0; i < i1; ++i)
    std::memcpy(out + (int64_t)(it.row0 + i) * ldq + (int64_t)kvh * group * hd, Os + (int64_t)(i - i0) * group * hd,
                sizeof(float) * group * hd);
}

// The exact softmax merge of a job's n partials (rows R, layout as in attend):
// out = sum_s e^(m_s - M) O_s / sum_s e^(m_s - M) l_s with M = max_s m_s.
static void merge_parts(const float* parts, int64_t slot_size, int n, int R, int hd, float* Os, float* w) {
  for (int r = 0; r < R; ++r) {
    float M = -INFINITY;
    for (int s = 0; s < n; ++s) M = std::max(M, parts[s * slot_size + (int64_t)R * hd + r]);
    float L = 0.f;
    for (int s = 0; s < n; ++s) {
      const float* p = parts + s * slot_size + (int64_t)R * hd;
      w[s] = p[r] == -INFINITY ? 0.f : std::exp(p[r] - M);
      L += w[s] * p[R + r];
    }
    float* o = Os + (int64_t)r * hd;
    for (int i = 0; i < hd; ++i) o[i] = 0.f;
    for (int s = 0; s < n; ++s) {
      const float* po = parts + s * slot_size + (int64_t)r * hd;
      for (int i = 0; i < hd; ++i) o[i] += w[s] * po[i];
    }
    const float inv = 1.0f / L;
    for (int i = 0; i < hd; ++i) o[i] *= inv;
  }
}

void attention(const AttnKernels& kt, bool kv_f16, const AttnItem* items, int n_items, int B, const float* q,
               const float* k, const float* v, int nh, int nkv, int hd, float* out, std::vector<float>& scratch) {
  const int group = nh / nkv;
  const bool lanes = kt.seg_lanes_f16 != nullptr;
  // Jobs: (item, KV head, up to kQueriesPerJob consecutive queries that see the same keys; with
  // the rows-in-lanes path also queries that differ only in how many fresh keys they see, as
  // under block size 1, where each sees one more: a causal job, whose rows the lanes kernels
  // limit (seg_lanes' lim), run on the keys of its last query. Without it every query of a
  // causal prefill was a job of its own on the 1-query kernels: 3x the attention time of the
  // same prompt block-causal, 512 tokens on the dev machine. Causal jobs need more than
  // kAttnDirectRows rows, i.e. two queries' rows, to take the lanes path.)
  const bool causal_jobs = lanes && 2 * group > kAttnDirectRows;
  std::vector<Job> jobs;
  std::vector<Visible> vis;
  std::vector<int> causal_nf;  // the fresh keys of each query of the causal jobs, kQueriesPerJob a job
  for (int t = 0; t < n_items; ++t) {
    const AttnItem& it = items[t];
    for (int i0 = 0; i0 < it.n;) {
      const Visible v0 = visible(it, B, i0);
      Visible vl = v0;
      int nf[kQueriesPerJob] = {v0.nf};
      int i1 = i0 + 1;
      for (; i1 < it.n && i1 - i0 < kQueriesPerJob; ++i1) {
        const Visible vi = visible(it, B, i1);
        if (!(vi == vl) && !(causal_jobs && vi.a1 == v0.a1 && vi.a2 == v0.a2 && vi.nb == v0.nb)) break;
        nf[i1 - i0] = vi.nf;
        vl = vi;
      }
      const int causal = vl.nf != v0.nf ? (int)causal_nf.size() : -1;
      if (causal >= 0) causal_nf.insert(causal_nf.end(), nf, nf + kQueriesPerJob);
      for (int h = 0; h < nkv; ++h) {
        jobs.push_back(Job{t, h, i0, i1, causal});
        vis.push_back(vl);
      }
      i0 = i1;
    }
  }
  const int64_t rows = (int64_t)kQueriesPerJob * group;
  // Partials: [R * hd output | R max | R sum], with rows in lanes [hd x Rp | Rp | Rp]
  const int64_t slot_size = lanes ? round16((int)(round16((int)rows) * (hd + 2))) : rows * (hd + 2);
  std::vector<Unit> units;
  std::vector<int> first_unit(jobs.size() + 1);
  int64_t n_slots = 0;
  int max_parts = 1;
  for (size_t j = 0; j < jobs.size(); ++j) {
    first_unit[j] = (int)units.size();
    const int nk = vis[j].a1 + vis[j].nb + vis[j].nf;
    const bool direct = (jobs[j].i1 - jobs[j].i0) * group <= kAttnDirectRows;
    const int64_t item_jobs = (int64_t)nkv * ((items[jobs[j].item].n + kQueriesPerJob - 1) / kQueriesPerJob);
    const int per = direct ? kUnitKeys
                           : (int)std::max<int64_t>(kUnitKeys, (nk * item_jobs / kUnitsPerItem + kUnitKeys - 1) /
                                                                   kUnitKeys * kUnitKeys);
    const int n = std::max(1, (nk + per - 1) / per);
    max_parts = std::max(max_parts, n);
    if (n == 1) {
      units.push_back(Unit{(int)j, 0, nk, -1});
      continue;
    }
    // n chunks of about equal length, cut at whole key tiles (direct: at 8 keys),
    // so only a job's last tile is partial
    const int cut = direct ? 8 : kAttnTile;
    const int len = ((nk + n - 1) / n + cut - 1) / cut * cut;
    for (int k0 = 0; k0 < nk; k0 += len) units.push_back(Unit{(int)j, k0, std::min(nk, k0 + len), slot_size * n_slots++});
  }
  first_unit[jobs.size()] = (int)units.size();
  // A lanes job split into several units has its queries transposed once, before the
  // units run (each unit did it again: ~8% of 8 queries x 512 keys on one thread).
  std::vector<int> pre;  // such jobs
  std::vector<int64_t> qt_off(jobs.size(), -1);
  const int64_t qt_size = round16((int)(round16((int)rows) * hd));
  if (lanes)
    for (size_t j = 0; j < jobs.size(); ++j)
      if ((jobs[j].i1 - jobs[j].i0) * group > kAttnDirectRows && first_unit[j + 1] - first_unit[j] > 1) {
        qt_off[j] = (int64_t)pre.size() * qt_size;
        pre.push_back((int)j);
      }
  const int nthreads = omp_get_max_threads();
  // Rows rounded to 16 (the lanes path's padding) and every area to 16 floats,
  // so the tiles start on 64-byte lines.
  const int64_t rows_p = round16((int)rows), qo_size = round16((int)(rows_p * hd));
  const int64_t s_size = round16((int)(rows_p * (kAttnTile + 2)));  // one tile's scores, then max and sum per row
  const int64_t tile_size = round16(kAttnTile * hd);
  const int64_t per_thread = qo_size * 2 + s_size + tile_size + round16(max_parts);
  const size_t need = (size_t)(nthreads * per_thread + n_slots * slot_size + (int64_t)pre.size() * qt_size) + 16;
  if (scratch.size() < need) scratch.resize(need);
  float* sbase = scratch.data() + ((64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64) / sizeof(float);
  float* parts = sbase + nthreads * per_thread;
  float* qts = parts + n_slots * slot_size;
  const int64_t ldq = (int64_t)nh * hd;
  // Units of a split job still running; the one that brings it to 0 merges.
  std::unique_ptr<std::atomic<int>[]> left(new std::atomic<int>[jobs.size()]);
  for (size_t j = 0; j < jobs.size(); ++j) left[j].store(first_unit[j + 1] - first_unit[j], std::memory_order_relaxed);
  const int64_t nunits = (int64_t)units.size(), npre = (int64_t)pre.size();
  const int team = nunits > 1 ? nthreads : 1;
  JobRanges ranges(nunits, team);
  TeamClock clock(kTeamAttention, team);
#pragma omp parallel if (nunits > 1)
  {
    clock.enter(omp_get_thread_num());
    if (npre) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t p = 0; p < npre; ++p) {
        const Job& jb = jobs[pre[p]];
        const int R = (jb.i1 - jb.i0) * group;
        kt.to_lanes(q + (int64_t)(items[jb.item].row0 + jb.i0) * ldq + (int64_t)jb.kvh * group * hd, ldq, group, R, hd,
                    qts + qt_off[pre[p]], round16(R));
      }
    }
    // (units of one job are neighbouring keys: one stretch of the cache per thread, JobRanges)
    ranges.run(omp_get_thread_num(), [&](int64_t u) {
      float* Qs = sbase + (int64_t)omp_get_thread_num() * per_thread;
      float* Os = Qs + qo_size;
      float* S = Os + qo_size;
      float* tile = S + s_size;
      float* w = tile + tile_size;
      const Unit& un = units[u];
      const Job& jb = jobs[un.job];
      const AttnItem& it = items[jb.item];
      float* part = un.slot < 0 ? nullptr : parts + un.slot;
      const float* qt = qt_off[un.job] < 0 ? nullptr : qts + qt_off[un.job];
      const int* nfq = jb.causal < 0 ? nullptr : causal_nf.data() + jb.causal;
      if (kv_f16)
        attend<uint16_t>(kt, it, vis[un.job], jb.i0, jb.i1, jb.kvh, group, un.k0, un.k1, q, k, v, nh, nkv, hd, out,
                         part, qt, Qs, Os, S, tile, nfq);
      else
        attend<float>(kt, it, vis[un.job], jb.i0, jb.i1, jb.kvh, group, un.k0, un.k1, q, k, v, nh, nkv, hd, out, part,
                      qt, Qs, Os, S, tile, nfq);
      // acq_rel: this unit's partial is visible to the merger, the others' to us.
      if (part && left[un.job].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        const int R = (jb.i1 - jb.i0) * group;
        const int u0 = first_unit[un.job];
        if (lanes && R > kAttnDirectRows) {
          kt.merge_lanes(parts + units[u0].slot, slot_size, first_unit[un.job + 1] - u0, round16(R), hd, Os, S);
          kt.from_lanes(Os, round16(R), R, hd, S, out + (int64_t)(it.row0 + jb.i0) * ldq + (int64_t)jb.kvh * group * hd,
                        ldq, group);
          return;
        }
        merge_parts(parts + units[u0].slot, slot_size, first_unit[un.job + 1] - u0, R, hd, Os, w);
        for (int i = jb.i0; i < jb.i1; ++i)
          std::memcpy(out + (int64_t)(it.row0 + i) * ldq + (int64_t)jb.kvh * group * hd,
                      Os + (int64_t)(i - jb.i0) * group * hd, sizeof(float) * group * hd);
      }
    });
    clock.done(omp_get_thread_num());
  }  // omp parallel
  clock.finish();
}

}  // namespace bitdlm
