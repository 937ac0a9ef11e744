// Block-causal grouped-query attention of fresh tokens over a KV cache.
#pragma once
#include <cstdint>
#include <vector>

namespace bitdlm {

// Hot loops of attention, one table per ISA (attention.cpp: portable,
// attention_avx2.cpp: AVX2 + F16C), picked from the kernels' active_isa().
// They work on the nq query heads that share one KV head at once, so each
// key/value row is loaded (and converted from fp16) once per group, not per head.
// Query head h is at q + h*ldq; key/value rows are `ld` elements apart.
struct AttnKernels {
  const char* name;
  // out[h * ldo + j] = scale * dot(q_h, K[j]), h < nq, j < nk
  void (*scores_f32)(const float* q, int64_t ldq, int nq, const float* K, int64_t ld, int nk, int d, float scale,
                     float* out, int64_t ldo);
  void (*scores_f16)(const float* q, int64_t ldq, int nq, const uint16_t* K, int64_t ld, int nk, int d, float scale,
                     float* out, int64_t ldo);
  // out_h (at out + h * ldout) += sum_j p[h * ldp + j] * V[j]
  void (*accum_f32)(const float* p, int64_t ldp, int nq, const float* V, int64_t ld, int nk, int d, float* out,
                    int64_t ldout);
  void (*accum_f16)(const float* p, int64_t ldp, int nq, const uint16_t* V, int64_t ld, int nk, int d, float* out,
                    int64_t ldout);
  // fp32 -> fp16 (round to nearest even) for K/V writes
  void (*to_f16)(const float* x, uint16_t* y, int n);
};

extern const AttnKernels kAttnPortable;
extern const AttnKernels kAttnAvx2;
const AttnKernels& attn_kernels();

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
// `scratch` is resized as needed (per-thread score rows).
void attention(bool kv_f16, const AttnItem* items, int n_items, int B, const float* q, const float* k,
               const float* v, int nh, int nkv, int hd, float* out, std::vector<float>& scratch);

}  // namespace bitdlm
