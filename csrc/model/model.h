// The BitNet b1.58 forward for a batch of sequences over a mmapped .bin.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/gemm.h"
#include "model/attention.h"
#include "model/kv_cache.h"

namespace bitdlm {

struct Config {
  int hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, inter = 0, vocab = 0;
  double rope_theta = 10000.0;
  float eps = 1e-5f;
  bool tied = true;
  bool lm_head_i8 = false;
  // int8 embedding rows with per-row scales (quant.embedding "i8"): tied, the lm_head's
  // int8 table; untied, model.embed_tokens.weight i8 + .scale (format/spec.py vocab_tensors)
  bool embed_i8 = false;
};

// A tensor inside the mapped file (validated against what the model expects).
struct TensorRef {
  const uint8_t* data = nullptr;
  std::string dtype;  // "f16" | "f32" | "i8" | "i2_b128"
  std::vector<int64_t> shape;
  float scale = 0.f;  // ternary weights: s_w
};

// One sequence's share of a forward call (see docs/architecture.md).
struct Item {
  int seq;
  std::vector<int32_t> tokens;
  int start, ctx_len;
  bool write;
  std::vector<int32_t> out_idx;
};

struct SelectArgs {
  std::vector<float> temperature, top_p, uniform;  // one per output row
  std::vector<int32_t> banned;
};

// Wall time per phase of the forward, summed over calls while profiling is on
// (BITDLM_PROFILE=1 at construction, or set_profile). Phases are timed on the
// calling thread around whole (parallel) regions, so they add up to the call.
// The small ops are fused (smallops.h): norm_quant = [residual add +] RMSNorm
// (input, post-attention and attention sub-norm) + activation quantization;
// act_quant = relu(gate)^2 * up + ffn sub-norm + quantization; rope_kv = RoPE
// of q and k + the K/V cache write; final_norm = last residual + model.norm.
enum Phase { kEmbed, kNormQuant, kGemmQkv, kRopeKv, kAttention, kGemmO, kGemmGateUp, kActQuant, kGemmDown,
             kFinalNorm, kLmHead, kSelect, kNumPhases };
extern const char* const kPhaseNames[kNumPhases];

// Diagnostics only (Model::forward_logits with a trace; scripts/logit_diag.py):
// the int8 activation codes and per-row scales of every activation quantization
// of one forward, in computation order. Ops per layer: "attn_in" (input_layernorm,
// feeds q/k/v), "attn_sub" (attn_sub_norm, feeds o_proj), "mlp_in"
// (post_attention_layernorm, feeds gate/up), "mlp_sub" (ffn_sub_norm, feeds down_proj).
struct ActTrace {
  struct Op {
    int layer;
    const char* name;
    int rows, K;
    std::vector<int8_t> codes;  // [rows, K]
    std::vector<float> scales;  // [rows]
  };
  std::vector<Op> ops;
};

class Model {
 public:
  Model(const Config& cfg, const std::map<std::string, TensorRef>& tensors, int64_t kv_budget, bool kv_f16);

  const Config& config() const { return cfg_; }
  int alloc_seq(int64_t capacity);
  void free_seq(int id);
  int64_t kv_bytes_used();
  int64_t kv_bytes_kept();  // freed sequences' blocks kept for reuse (KvCache::alloc)
  int64_t kv_zero_filled();  // cache positions zeroed because a forward read them unwritten (KvCache::prepare)
  int64_t kv_bytes_per_token() const { return kv_.bytes_for(1); }
  bool kv_f16() const { return kv_.f16(); }

  // logits [total_out, vocab] into out, total_out = the items' out_idx sizes summed.
  // Both forwards validate the items first (std::invalid_argument). A trace (not
  // for serving: it copies every activation code) collects the codes of this call.
  void forward_logits(const std::vector<Item>& items, int block_size, float* out, ActTrace* trace = nullptr);
  // (token, confidence) per output row.
  void forward_select(const std::vector<Item>& items, int block_size, const SelectArgs& sel, int32_t* tok,
                      float* conf);

  void set_profile(bool on);
  bool profiling() const { return prof_on_; }
  // (phase name, seconds) since the last reset, and the number of forward calls.
  std::vector<std::pair<std::string, double>> profile();
  int64_t profiled_calls();
  void reset_profile();

 public:
  struct Ternary {
    const uint8_t* data;
    int M, K;
    float scale;
  };

 private:
  struct Layer {
    const float *in_norm, *post_norm, *attn_sub, *ffn_sub;
    Ternary q, k, v, o, gate, up, down;
  };
  // Throws std::invalid_argument on a bad item; n_out = output rows. (mu_ held)
  void validate(const std::vector<Item>& items, int block_size, int64_t* n_out);
  // All layers and the final norm: xo_ = norm(hidden) of the output rows; returns their number.
  // The stages, in order (model.cpp says what each leaves where):
  int run(const std::vector<Item>& items, int block_size);
  void embed_rope(const std::vector<Item>& items, int N);
  void attention_block(int layer, const std::vector<Item>& items, int block_size, int N);
  void mlp_block(int layer, int N);
  int final_norm(const std::vector<Item>& items, int N);
  void trace_codes(int layer, const char* op, int N, int K, int Kp);  // (no-op unless tracing)
  // lm_head of `rows` rows of xo_ starting at row r0 -> out [rows, vocab].
  void head(int r0, int rows, float* out);

  Config cfg_;
  std::vector<Layer> layers_;
  const uint16_t* embed_ = nullptr;      // f16 [V, H], or null with:
  const int8_t* embed_i8_ = nullptr;     // i8 [V, H], row t = float(q[t]) * embed_scale_[t]
  const float* embed_scale_ = nullptr;
  const float* final_norm_;
  const uint16_t* head_f16_ = nullptr;  // f16 [V, H] (the embedding when tied); null: head_i8_
  const int8_t* head_i8_ = nullptr;
  const float* head_scale_ = nullptr;
  KvCache kv_;
  std::mutex mu_;  // one forward at a time; alloc/free never race a forward
  bool prof_on_ = false;
  double prof_[kNumPhases] = {};
  int64_t prof_calls_ = 0;
  // What profile() returns: a copy made after each forward under its own
  // mutex, so reading it (a /metrics scrape) never waits for a forward.
  void publish_profile();
  std::mutex prof_mu_;
  double prof_pub_[kNumPhases] = {};
  int64_t prof_pub_calls_ = 0;

  // Scratch reused across calls (grown on demand).
  std::vector<float> x_, q_, k_, v_, att_, g_, u_, tmp_, xo_, cos_, sin_, attn_scratch_, logits_;
  ActBuffer aq_;  // 64-byte aligned (gemm.h kActAlign)
  std::vector<float> as_;
  std::vector<int32_t> asum_;
  std::vector<int> row_item_, out_row_;  // item of each fresh row; row of each output
  std::vector<AttnItem> ai_;             // attention's view of each item
  ActTrace* trace_ = nullptr;            // set for one forward_logits call
};

}  // namespace bitdlm
