// Block-causal grouped-query attention of fresh tokens over a KV cache.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/gemm.h"

namespace bitdlm {

// Hot loops of attention, one table per ISA (attention.cpp: portable,
// attention_avx2.cpp: AVX2 + FMA + F16C, attention_avx512.cpp: AVX-512 for the
// tiled path; aarch64: attention_neon.cpp), indexed by the kernels' active_isa_id().
//
// attention() works on tiles: R query rows (a few queries x the query heads
// sharing one KV head, copied into a contiguous [R, d] block) against key tiles
// of at most kAttnTile keys. Each key/value row is converted from fp16 once per
// tile and used by all R rows, so scores and values are two small GEMMs
// (register-blocked, FMA-bound) instead of one dot product per query and key.
// With at most kAttnDirectRows rows (decoding: one query) the tiles would cost
// as much as the products: scores and values then read K/V rows directly.
// A table with seg_lanes_* (AVX-512, AVX2) runs the tiled path with the rows in
// vector lanes instead (attention.cpp attend_lanes; docs/architecture.md).
constexpr int kAttnTile = 64;
constexpr int kAttnDirectRows = 4;

struct AttnKernels {
  // KT[i * ldkt + j] = K[j * ld + i] as fp32 (i < d, j < nk); columns nk..round8(nk) set to 0.
  void (*k_tile_f32)(const float* K, int64_t ld, int nk, int d, float* KT, int ldkt);
  void (*k_tile_f16)(const uint16_t* K, int64_t ld, int nk, int d, float* KT, int ldkt);
  // Vf[j * d + i] = V[j * ld + i] as fp32
  void (*v_tile_f16)(const uint16_t* V, int64_t ld, int nk, int d, float* Vf);
  // S[r * lds + j] = scale * sum_i Q[r * d + i] * KT[i * ldkt + j], r < R, j < round8(nk)
  void (*qk)(const float* Q, int R, const float* KT, int ldkt, int nk, int d, float scale, float* S, int64_t lds);
  // The same straight from K rows (K[j * ld + i]), for few rows (R <= 4: decoding)
  void (*qk_direct_f32)(const float* Q, int R, const float* K, int64_t ld, int nk, int d, float scale, float* S,
                        int64_t lds);
  void (*qk_direct_f16)(const float* Q, int R, const uint16_t* K, int64_t ld, int nk, int d, float scale, float* S,
                        int64_t lds);
  // Online softmax over one key tile (rows r < R of S, first n columns): with
  // the running max m[r] and sum l[r] so far, S[r] becomes exp(S[r] - m'),
  // m[r] = m' = max(m[r], max S[r]), l[r] = l[r] e^(m - m') + sum, and the
  // partial output O[r * d ..] is rescaled by e^(m - m').
  void (*softmax_tile)(float* S, int64_t lds, int R, int n, float* m, float* l, float* O, int d);
  // O[r * d + i] += sum_j P[r * ldp + j] * V[j * ldv + i], r < R, j < nk, i < d
  void (*pv_f32)(const float* P, int64_t ldp, int R, const float* V, int64_t ldv, int nk, int d, float* O);
  void (*pv_f16)(const float* P, int64_t ldp, int R, const uint16_t* V, int64_t ldv, int nk, int d, float* O);
  // fp32 -> fp16 (round to nearest even) for K/V writes
  void (*to_f16)(const float* x, uint16_t* y, int n);
  // Optional (null in the portable and NEON tables): the tiled path with the rows in
  // vector lanes. One segment of nk keys (K/V rows at stride ld) for Rp rows (a
  // multiple of 16): queries QT[i * Rp + r] (transposed, padding lanes 0), the
  // running max m[r], sum l[r] and unnormalized output OT[i * Rp + r] updated
  // as by qk + softmax_tile + pv over its key tiles (OT is not read in rows
  // whose m is still -inf: it need not be initialized). ST: kAttnTile * Rp floats
  // (scores, keys x rows), tile: kAttnTile * d floats (fp16 K / V blocks as fp32).
  // lim (null: every key): per row, the keys of the segment it may see, [0, lim[r]) (causal
  // rows of one job: the running max is taken over those alone; a row that sees none keeps m = -inf).
  void (*seg_lanes_f32)(const float* QT, int Rp, const float* K, const float* V, int64_t ld, int nk, int d, float scale,
                        float* m, float* l, float* OT, float* ST, float* tile, const float* lim);
  void (*seg_lanes_f16)(const float* QT, int Rp, const uint16_t* K, const uint16_t* V, int64_t ld, int nk, int d,
                        float scale, float* m, float* l, float* OT, float* ST, float* tile, const float* lim);
  // Rows <-> lanes for the above, row r at X + (r / group) * ldx + (r % group) * d:
  // XT[i * Rp + r] = X[row r][i] (rows R..Rp zero); X[row r][i] = XT[i * Rp + r] * (sc ? sc[r] : 1).
  void (*to_lanes)(const float* X, int64_t ldx, int group, int R, int d, float* XT, int Rp);
  void (*from_lanes)(const float* XT, int Rp, int R, int d, const float* sc, float* X, int64_t ldx, int group);
  // The exact softmax merge of n partials in lanes layout (slot s at parts + s *
  // slot_size: [OT d x Rp | m Rp | l Rp]): OT = sum_s e^(m_s - M) OT_s,
  // inv_l[r] = 1 / sum_s e^(m_s - M) l_s with M = max_s m_s.
  void (*merge_lanes)(const float* parts, int64_t slot_size, int n, int Rp, int d, float* OT, float* inv_l);
};

// The tables (any entry may be nullptr: the level below's serves; kernels/isa_table.h).
extern const AttnKernels kAttnPortable;
#if defined(__x86_64__)
extern const AttnKernels kAttnAvx2;
extern const AttnKernels kAttnAvx512Own;  // AVX-512 (attention_avx512.cpp): its own tiled-path kernels
#elif defined(__aarch64__)
extern const AttnKernels kAttnNeon;  // attention_neon.cpp (every ARM level)
#endif
// The table of an ISA level (active_isa_id(); levels without their own use the best lower one).
const AttnKernels& attn_kernels(Isa isa);
inline const AttnKernels& attn_kernels() { return attn_kernels(active_isa_id()); }

// One item of a forward call as attention sees it, for one layer.
struct AttnItem {
  const void* kc;   // this layer's K cache [n_kv, cap, hd] (float or fp16 bits)
  const void* vc;   // same for V
  int64_t cap;
  int start;        // absolute position of the first fresh token
  int n;            // fresh tokens
  int ctx_len;      // cached positions [0, ctx_len) are visible (minus [start, start+n))
  int row0;         // row of the first fresh token in q/k/v/out
};

// out[row, h*hd:(h+1)*hd] = softmax(q k^T * hd^-0.5 + block mask) v for every
// item and query head. Fresh keys/values come from k/v (fp32, rows of n_kv*hd),
// cached ones from the cache, where positions [start, start+n) are skipped
// (the fresh tokens replace them). p sees q iff q / B <= p / B.
// `scratch` is resized as needed (per-thread tiles and score rows). `kt`: the
// ISA's table (attn_kernels()).
void attention(const AttnKernels& kt, bool kv_f16, const AttnItem* items, int n_items, int B, const float* q, const float* k,
               const float* v, int nh, int nkv, int hd, float* out, std::vector<float>& scratch);

}  // namespace bitdlm
