#include "model/model.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <stdexcept>
#include <unordered_set>

#include "kernels/team_clock.h"
#include "model/attention.h"
#include "model/smallops.h"
#include "model/sampling.h"

namespace bitdlm {

const char* const kPhaseNames[kNumPhases] = {"embed",  "norm_quant",   "gemm_qkv",  "rope_kv",    "attention",
                                             "gemm_o", "gemm_gate_up", "act_quant", "gemm_down",  "final_norm",
                                             "lm_head", "select"};

namespace {
// Adds the lifetime of a scope to one phase (when profiling).
struct PhaseTimer {
  double* slot;
  double t0;
  PhaseTimer(bool on, double* prof, Phase p) : slot(on ? prof + p : nullptr), t0(on ? omp_get_wtime() : 0.0) {}
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;
  void stop() {
    if (slot) *slot += omp_get_wtime() - t0;
    slot = nullptr;
  }
  ~PhaseTimer() { stop(); }
};
}  // namespace


namespace {

TernaryW ternary_w(const Model::Ternary& w, float* y) { return TernaryW{w.data, w.M, w.scale, y, w.M}; }

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

const TensorRef& need(const std::map<std::string, TensorRef>& t, const std::string& name, const char* dtype,
                      std::vector<int64_t> shape) {
  auto it = t.find(name);
  if (it == t.end()) throw std::invalid_argument("model file lacks tensor " + name);
  const TensorRef& r = it->second;
  if (r.dtype != dtype) throw std::invalid_argument(name + ": dtype " + r.dtype + ", expected " + dtype);
  if (r.shape != shape)
    throw std::invalid_argument(name + ": shape " + shape_str(r.shape) + ", expected " + shape_str(shape));
  if (!r.data) throw std::invalid_argument(name + ": no data");
  return r;
}

template <class V>
void grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

Model::Model(const Config& c, const std::map<std::string, TensorRef>& t, int64_t kv_budget, bool kv_f16)
    : cfg_(c), kv_(c.layers, c.kv_heads, c.head_dim, kv_f16, kv_budget) {
  if (c.hidden <= 0 || c.layers <= 0 || c.heads <= 0 || c.kv_heads <= 0 || c.head_dim <= 0 || c.inter <= 0 ||
      c.vocab <= 0)
    throw std::invalid_argument("model config: sizes must be positive");
  const char* prof = std::getenv("BITDLM_PROFILE");
  prof_on_ = prof && *prof && std::string(prof) != "0";
  if (prof_on_) set_team_profile(true);
  if (c.heads % c.kv_heads) throw std::invalid_argument("model config: num_attention_heads % num_key_value_heads != 0");
  if (c.head_dim % 2) throw std::invalid_argument("model config: head_dim must be even (RoPE)");
  if (kv_budget < 0) throw std::invalid_argument("kv_budget_bytes must be >= 0");
  const int64_t H = c.hidden, QD = (int64_t)c.heads * c.head_dim, KVD = (int64_t)c.kv_heads * c.head_dim;
  auto ternary = [&](const std::string& name, int64_t M, int64_t K) {
    const TensorRef& r = need(t, name, "i2_b128", {M, K});
    if (!(r.scale > 0.f) || !std::isfinite(r.scale)) throw std::invalid_argument(name + ": bad scale");
    return Ternary{r.data, (int)M, (int)K, r.scale};
  };
  auto f32 = [&](const std::string& name, int64_t n) {
    return reinterpret_cast<const float*>(need(t, name, "f32", {n}).data);
  };
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Layer L;
    L.in_norm = f32(p + "input_layernorm.weight", H);
    L.post_norm = f32(p + "post_attention_layernorm.weight", H);
    L.attn_sub = f32(p + "self_attn.attn_sub_norm.weight", QD);
    L.ffn_sub = f32(p + "mlp.ffn_sub_norm.weight", c.inter);
    L.q = ternary(p + "self_attn.q_proj.weight", QD, H);
    L.k = ternary(p + "self_attn.k_proj.weight", KVD, H);
    L.v = ternary(p + "self_attn.v_proj.weight", KVD, H);
    L.o = ternary(p + "self_attn.o_proj.weight", H, QD);
    L.gate = ternary(p + "mlp.gate_proj.weight", c.inter, H);
    L.up = ternary(p + "mlp.up_proj.weight", c.inter, H);
    L.down = ternary(p + "mlp.down_proj.weight", H, c.inter);
    layers_.push_back(L);
  }
  final_norm_ = f32("model.norm.weight", H);
  // The embedding / lm_head rule of format/spec.py vocab_tensors.
  if (c.lm_head_i8) {
    head_i8_ = reinterpret_cast<const int8_t*>(need(t, "lm_head.weight", "i8", {c.vocab, H}).data);
    head_scale_ = f32("lm_head.scale", c.vocab);
  }
  if (!c.embed_i8) {
    embed_ = reinterpret_cast<const uint16_t*>(need(t, "model.embed_tokens.weight", "f16", {c.vocab, H}).data);
  } else if (c.tied) {
    if (!c.lm_head_i8)
      throw std::invalid_argument("an i8 embedding of a tied model reads the int8 lm_head: it needs lm_head i8");
    embed_i8_ = head_i8_;
    embed_scale_ = head_scale_;
  } else {
    embed_i8_ = reinterpret_cast<const int8_t*>(need(t, "model.embed_tokens.weight", "i8", {c.vocab, H}).data);
    embed_scale_ = f32("model.embed_tokens.scale", c.vocab);
  }
  if (!c.lm_head_i8)  // (tied: an f16 lm_head is the f16 embedding, set above)
    head_f16_ = c.tied ? embed_
                       : reinterpret_cast<const uint16_t*>(need(t, "lm_head.weight", "f16", {c.vocab, H}).data);
}

void Model::set_profile(bool on) {
  std::lock_guard<std::mutex> g(mu_);
  prof_on_ = on;
  set_team_profile(on);  // (process-wide: the parallel regions' clocks, kernels/team_clock.h)
}

std::vector<std::pair<std::string, double>> Model::profile() {
  std::lock_guard<std::mutex> g(prof_mu_);
  std::vector<std::pair<std::string, double>> out;
  for (int p = 0; p < kNumPhases; ++p) out.emplace_back(kPhaseNames[p], prof_pub_[p]);
  return out;
}

int64_t Model::profiled_calls() {
  std::lock_guard<std::mutex> g(prof_mu_);
  return prof_pub_calls_;
}

void Model::publish_profile() {  // (called with mu_ held)
  if (!prof_on_) return;
  std::lock_guard<std::mutex> g(prof_mu_);
  std::copy(prof_, prof_ + kNumPhases, prof_pub_);
  prof_pub_calls_ = prof_calls_;
}

void Model::reset_profile() {
  std::lock_guard<std::mutex> g(mu_);
  std::lock_guard<std::mutex> g2(prof_mu_);
  for (int p = 0; p < kNumPhases; ++p) prof_[p] = prof_pub_[p] = 0.0;
  prof_calls_ = prof_pub_calls_ = 0;
}

int Model::alloc_seq(int64_t capacity) {
  std::lock_guard<std::mutex> g(mu_);
  return kv_.alloc(capacity);
}

void Model::free_seq(int id) {
  std::lock_guard<std::mutex> g(mu_);
  kv_.free(id);
}

int64_t Model::kv_bytes_used() {
  std::lock_guard<std::mutex> g(mu_);
  return kv_.bytes_used();
}

int64_t Model::kv_bytes_kept() {
  std::lock_guard<std::mutex> g(mu_);
  return kv_.bytes_kept();
}

int64_t Model::kv_zero_filled() {
  std::lock_guard<std::mutex> g(mu_);
  return kv_.zero_filled();
}

void Model::validate(const std::vector<Item>& items, int B, int64_t* n_out) {
  if (B < 1) throw std::invalid_argument("block_size must be >= 1, got " + std::to_string(B));
  std::unordered_set<int> seen;
  int64_t outs = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const std::string at = "item " + std::to_string(i) + ": ";
    if (!kv_.has(it.seq)) throw std::invalid_argument(at + "unknown sequence id " + std::to_string(it.seq));
    if (!seen.insert(it.seq).second)
      throw std::invalid_argument(at + "sequence id " + std::to_string(it.seq) + " appears twice in one call");
    const int64_t cap = kv_.capacity(it.seq);
    const int64_t n = (int64_t)it.tokens.size();
    if (n == 0) throw std::invalid_argument(at + "no tokens");
    if (it.start < 0 || it.start + n > cap)
      throw std::invalid_argument(at + "positions [" + std::to_string(it.start) + ", " + std::to_string(it.start + n) +
                                  ") outside the cache capacity " + std::to_string(cap));
    if (it.ctx_len < 0 || it.ctx_len > cap)
      throw std::invalid_argument(at + "ctx_len " + std::to_string(it.ctx_len) + " outside [0, " + std::to_string(cap) +
                                  "]");
    for (int32_t tok : it.tokens)
      if (tok < 0 || tok >= cfg_.vocab)
        throw std::invalid_argument(at + "token id " + std::to_string(tok) + " outside [0, " +
                                    std::to_string(cfg_.vocab) + ")");
    for (int32_t o : it.out_idx)
      if (o < 0 || o >= n)
        throw std::invalid_argument(at + "out_idx " + std::to_string(o) + " outside [0, " + std::to_string(n) + ")");
    outs += (int64_t)it.out_idx.size();
  }
  *n_out = outs;
}

void Model::forward_logits(const std::vector<Item>& items, int B, float* out, ActTrace* trace) {
  std::lock_guard<std::mutex> g(mu_);
  int64_t n_out;
  validate(items, B, &n_out);
  trace_ = trace;
  struct Reset {
    ActTrace*& p;
    ~Reset() { p = nullptr; }
  } reset{trace_};
  const int rows = run(items, B);
  {
    PhaseTimer t(prof_on_, prof_, kLmHead);
    if (rows) head(0, rows, out);
  }
  publish_profile();
}

void Model::forward_select(const std::vector<Item>& items, int B, const SelectArgs& sel, int32_t* tok, float* conf) {
  std::lock_guard<std::mutex> g(mu_);
  int64_t n_out;
  validate(items, B, &n_out);
  if ((int64_t)sel.temperature.size() != n_out || (int64_t)sel.top_p.size() != n_out ||
      (int64_t)sel.uniform.size() != n_out)
    throw std::invalid_argument("temperature, top_p and uniforms need one value per output row");
  std::vector<char> is_banned(cfg_.vocab, 0);
  for (int32_t b : sel.banned) {
    if (b < 0 || b >= cfg_.vocab) throw std::invalid_argument("banned id " + std::to_string(b) + " outside the vocab");
    is_banned[b] = 1;
  }
  if (std::count(is_banned.begin(), is_banned.end(), 1) == cfg_.vocab)
    throw std::invalid_argument("every token id is banned");
  const int64_t V = cfg_.vocab;
  const int rows = run(items, B);
  // lm_head + selection in chunks: the logits scratch stays small whatever the row count.
  constexpr int kChunk = 64;
  grow(logits_, (size_t)std::min(rows, kChunk) * V);
  for (int r0 = 0; r0 < rows; r0 += kChunk) {
    const int nr = std::min(kChunk, rows - r0);
    {
      PhaseTimer t(prof_on_, prof_, kLmHead);
      head(r0, nr, logits_.data());
    }
    PhaseTimer t(prof_on_, prof_, kSelect);
    for (int r = 0; r < nr; ++r)
      for (int32_t b : sel.banned) logits_[(int64_t)r * V + b] = -INFINITY;
    select_rows(logits_.data(), nr, (int)V, V, sel.temperature.data() + r0, sel.top_p.data() + r0,
                sel.uniform.data() + r0, tok + r0, conf + r0);
  }
  publish_profile();
}

// The forward proper: named stages over the smallops drivers. Every GEMM sees
// all tokens of all items at once; rows are the fresh tokens in call order.
int Model::run(const std::vector<Item>& items, int B) {
  const Config& c = cfg_;
  const int H = c.hidden, I = c.inter, QD = c.heads * c.head_dim, KVD = c.kv_heads * c.head_dim;
  const int Kpmax = std::max((int)pad_k(H), std::max((int)pad_k(QD), (int)pad_k(I)));
  int64_t N64 = 0;
  for (const Item& it : items) N64 += (int64_t)it.tokens.size();
  if (N64 == 0) return 0;
  if (N64 > (1 << 24)) throw std::invalid_argument("too many tokens in one call");
  const int N = (int)N64;
  if (prof_on_) ++prof_calls_;

  grow(x_, (size_t)N * H);
  grow(q_, (size_t)N * QD);
  grow(att_, (size_t)N * QD);
  grow(k_, (size_t)N * KVD);
  grow(v_, (size_t)N * KVD);
  grow(g_, (size_t)N * I);
  grow(u_, (size_t)N * I);
  grow(tmp_, (size_t)N * H);
  grow(cos_, (size_t)N * (c.head_dim / 2));
  grow(sin_, (size_t)N * (c.head_dim / 2));
  grow(aq_, (size_t)N * Kpmax);
  grow(as_, (size_t)N);
  grow(asum_, (size_t)N);
  row_item_.resize(N);
  ai_.resize(items.size());
  for (size_t t = 0, row = 0; t < items.size(); ++t) {
    const Item& it = items[t];
    ai_[t] = AttnItem{nullptr, nullptr, kv_.capacity(it.seq), it.start, (int)it.tokens.size(), it.ctx_len, (int)row};
    for (size_t j = 0; j < it.tokens.size(); ++j) row_item_[row++] = (int)t;
    kv_.prepare(it.seq, it.start, (int64_t)it.tokens.size(), it.ctx_len, it.write);  // (unwritten reads: zeros)
  }

  embed_rope(items, N);
  // The last output projection (in tmp_) is not added to x_ at once: the add is
  // fused into the next norm + quantize, or into the final norm.
  for (int l = 0; l < c.layers; ++l) {
    attention_block(l, items, B, N);
    mlp_block(l, N);
  }
  for (const Item& it : items)
    if (it.write) kv_.written(it.seq, it.start, (int64_t)it.tokens.size());
  return final_norm(items, N);
}

// Embedding rows (f16 decoded, or int8 x the row's scale in fp32) and the RoPE tables
// (the same formulas and fp32 rounding as transformers).
void Model::embed_rope(const std::vector<Item>& items, int N) {
  const int H = cfg_.hidden, half = cfg_.head_dim / 2;
  PhaseTimer t(prof_on_, prof_, kEmbed);
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i)
    inv_freq[i] = 1.0f / std::pow((float)cfg_.rope_theta, (float)(2 * i) / (float)cfg_.head_dim);
  const SmallOps& so = small_ops();
  for_rows(N, [&](int r) {
    const AttnItem& a = ai_[row_item_[r]];
    const int j = r - a.row0;
    const int64_t tok = items[row_item_[r]].tokens[j];
    if (embed_i8_)
      so.i8_row(embed_i8_ + tok * H, embed_scale_[tok], x_.data() + (int64_t)r * H, H);
    else
      so.f16_row(embed_ + tok * H, x_.data() + (int64_t)r * H, H);
    const float pos = (float)(a.start + j);
    for (int i = 0; i < half; ++i) {
      const float f = pos * inv_freq[i];
      cos_[(int64_t)r * half + i] = std::cos(f);
      sin_[(int64_t)r * half + i] = std::sin(f);
    }
  });
}

// x += o_proj(attn_sub_norm(attention(q, k, v))), q/k/v from input_layernorm(x + pending
// down_proj of the layer before); one activation quantization feeds q, k and v. The o_proj
// output is left pending in tmp_.
void Model::attention_block(int l, const std::vector<Item>& items, int B, int N) {
  const Config& c = cfg_;
  const Layer& L = layers_[l];
  const int H = c.hidden, hd = c.head_dim, nh = c.heads, nkv = c.kv_heads, QD = nh * hd, KVD = nkv * hd;
  const int KpH = (int)pad_k(H), KpQ = (int)pad_k(QD);
  const SmallOps& so = small_ops();
  const AttnKernels& akt = attn_kernels();
  {
    PhaseTimer t(prof_on_, prof_, kNormQuant);
    add_norm_quant_rows(so, x_.data(), l ? tmp_.data() : nullptr, L.in_norm, N, H, c.eps, aq_.data(), as_.data(),
                        asum_.data(), KpH);
  }
  trace_codes(l, "attn_in", N, H, KpH);
  {
    const TernaryW w[3] = {ternary_w(L.q, q_.data()), ternary_w(L.k, k_.data()), ternary_w(L.v, v_.data())};
    PhaseTimer t(prof_on_, prof_, kGemmQkv);
    gemm_i2_i8(w, 3, ActQ{aq_.data(), as_.data(), asum_.data(), N, KpH});
  }
  {
    // RoPE of q and k and the K/V cache write, one pass per row.
    PhaseTimer t(prof_on_, prof_, kRopeKv);
    for (size_t i = 0; i < items.size(); ++i) {
      ai_[i].kc = kv_.k(items[i].seq, l);
      ai_[i].vc = kv_.v(items[i].seq, l);
    }
    const bool f16 = kv_.f16();
    const size_t esz = f16 ? 2 : 4;
    const int half = hd / 2;
    for_rows(N, [&](int r) {
      const float* cr = cos_.data() + (int64_t)r * half;
      const float* sr = sin_.data() + (int64_t)r * half;
      so.rope(q_.data() + (int64_t)r * QD, cr, sr, nh, hd);
      so.rope(k_.data() + (int64_t)r * KVD, cr, sr, nkv, hd);
      const Item& it = items[row_item_[r]];
      if (!it.write) return;
      const AttnItem& a = ai_[row_item_[r]];
      const int j = r - a.row0;
      // Cache layout [n_kv, cap, hd]: scatter the row's heads.
      for (int h = 0; h < nkv; ++h) {
        const int64_t src = (int64_t)r * KVD + (int64_t)h * hd;
        const int64_t dst = ((int64_t)h * a.cap + it.start + j) * hd;
        char* kd = static_cast<char*>(const_cast<void*>(a.kc)) + dst * esz;
        char* vd = static_cast<char*>(const_cast<void*>(a.vc)) + dst * esz;
        if (f16) {
          akt.to_f16(k_.data() + src, reinterpret_cast<uint16_t*>(kd), hd);
          akt.to_f16(v_.data() + src, reinterpret_cast<uint16_t*>(vd), hd);
        } else {
          std::memcpy(kd, k_.data() + src, sizeof(float) * hd);
          std::memcpy(vd, v_.data() + src, sizeof(float) * hd);
        }
      }
    });
  }
  {
    PhaseTimer t(prof_on_, prof_, kAttention);
    attention(akt, kv_.f16(), ai_.data(), (int)ai_.size(), B, q_.data(), k_.data(), v_.data(), nh, nkv, hd,
              att_.data(), attn_scratch_);
  }
  {
    PhaseTimer t(prof_on_, prof_, kNormQuant);
    add_norm_quant_rows(so, att_.data(), nullptr, L.attn_sub, N, QD, c.eps, aq_.data(), as_.data(), asum_.data(),
                        KpQ);
  }
  trace_codes(l, "attn_sub", N, QD, KpQ);
  const TernaryW w = ternary_w(L.o, tmp_.data());
  PhaseTimer t(prof_on_, prof_, kGemmO);
  gemm_i2_i8(&w, 1, ActQ{aq_.data(), as_.data(), asum_.data(), N, KpQ});
}

// x += pending o_proj, then x's down_proj(ffn_sub_norm(relu(gate(m))^2 * up(m))),
// m = post_attention_layernorm(x), is left pending in tmp_.
void Model::mlp_block(int l, int N) {
  const Config& c = cfg_;
  const Layer& L = layers_[l];
  const int H = c.hidden, I = c.inter, KpH = (int)pad_k(H), KpI = (int)pad_k(I);
  const SmallOps& so = small_ops();
  {
    PhaseTimer t(prof_on_, prof_, kNormQuant);
    add_norm_quant_rows(so, x_.data(), tmp_.data(), L.post_norm, N, H, c.eps, aq_.data(), as_.data(), asum_.data(),
                        KpH);
  }
  trace_codes(l, "mlp_in", N, H, KpH);
  {
    // gate and up in one multi-GEMM
    const TernaryW w[2] = {ternary_w(L.gate, g_.data()), ternary_w(L.up, u_.data())};
    PhaseTimer t(prof_on_, prof_, kGemmGateUp);
    gemm_i2_i8(w, 2, ActQ{aq_.data(), as_.data(), asum_.data(), N, KpH});
  }
  {
    PhaseTimer t(prof_on_, prof_, kActQuant);
    act_norm_quant_rows(so, g_.data(), u_.data(), L.ffn_sub, N, I, c.eps, aq_.data(), as_.data(), asum_.data(), KpI);
  }
  trace_codes(l, "mlp_sub", N, I, KpI);
  const TernaryW w = ternary_w(L.down, tmp_.data());
  PhaseTimer t(prof_on_, prof_, kGemmDown);
  gemm_i2_i8(&w, 1, ActQ{aq_.data(), as_.data(), asum_.data(), N, KpI});
}

// xo_ = model.norm(x + pending down_proj) of the output rows only (an output row
// may repeat); returns their number.
int Model::final_norm(const std::vector<Item>& items, int N) {
  const int H = cfg_.hidden;
  PhaseTimer t(prof_on_, prof_, kFinalNorm);
  out_row_.clear();
  for (size_t i = 0; i < items.size(); ++i)
    for (int32_t idx : items[i].out_idx) out_row_.push_back(ai_[i].row0 + idx);
  const int NO = (int)out_row_.size();
  grow(xo_, (size_t)NO * H);
  const SmallOps& so = small_ops();
  const float *x = x_.data(), *d = tmp_.data();
  for_rows(NO, [&](int o) {
    const int64_t r = (int64_t)out_row_[o] * H;
    float* y = xo_.data() + (int64_t)o * H;
    for (int i = 0; i < H; ++i) y[i] = x[r + i] + d[r + i];
    so.rmsnorm(y, final_norm_, y, H, cfg_.eps);
  });
  return NO;
}

void Model::trace_codes(int layer, const char* op, int N, int K, int Kp) {
  if (!trace_) return;
  ActTrace::Op t{layer, op, N, K, std::vector<int8_t>((size_t)N * K), std::vector<float>(as_.begin(), as_.begin() + N)};
  for (int r = 0; r < N; ++r) std::memcpy(t.codes.data() + (size_t)r * K, aq_.data() + (size_t)r * Kp, K);
  trace_->ops.push_back(std::move(t));
}

void Model::head(int r0, int rows, float* out) {
  const int H = cfg_.hidden, V = cfg_.vocab;
  const float* x = xo_.data() + (int64_t)r0 * H;
  if (head_i8_) {
    const int KpH = (int)pad_k(H);
    grow(aq_, (size_t)rows * KpH);  // out_idx may repeat rows: more rows than tokens
    grow(as_, (size_t)rows);
    grow(asum_, (size_t)rows);
    quantize_act(x, rows, H, KpH, aq_.data(), as_.data(), asum_.data());
    const ActQ a{aq_.data(), as_.data(), asum_.data(), rows, KpH};
    gemm_i8_i8(head_i8_, head_scale_, V, H, a, out, V);
  } else {
    gemm_f16_f32(head_f16_, V, H, x, rows, out, V);
  }
}

}  // namespace bitdlm
