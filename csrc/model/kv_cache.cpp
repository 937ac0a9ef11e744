#include "model/kv_cache.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

namespace bitdlm {

KvCache::KvCache(int layers, int n_kv, int head_dim, bool f16, int64_t budget_bytes)
    : layers_(layers), n_kv_(n_kv), hd_(head_dim), f16_(f16), budget_(budget_bytes) {
  elem_ = f16 ? 2 : 4;
  per_pos_ = (int64_t)layers * 2 * n_kv * head_dim * elem_;
}

KvCache::~KvCache() {
  for (auto& kv : seqs_) std::free(kv.second.data);
}

int KvCache::alloc(int64_t capacity) {
  if (capacity <= 0 || capacity > (1 << 30))
    throw std::invalid_argument("alloc_seq: capacity must be in [1, 2^30], got " + std::to_string(capacity));
  const int64_t bytes = bytes_for(capacity);
  if (used_ + bytes > budget_)
    throw KvBudgetError("KV cache budget exceeded: a sequence of capacity " + std::to_string(capacity) + " needs " +
                        std::to_string(bytes) + " bytes, " + std::to_string(budget_ - used_) + " of " +
                        std::to_string(budget_) + " bytes are free");
  // Not zeroed (prepare zeroes what a forward would read unwritten). Large blocks come
  // from mmap, committed page by page as they are written: unused capacity costs no RSS.
  char* p = static_cast<char*>(std::malloc((size_t)bytes));
  if (!p) throw KvBudgetError("KV cache: allocation of " + std::to_string(bytes) + " bytes failed");
  const int id = next_id_++;  // ids are never reused: a stale id fails loudly
  seqs_[id] = Seq{p, capacity};
  used_ += bytes;
  return id;
}

void KvCache::free(int id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw std::out_of_range("free_seq: unknown sequence id " + std::to_string(id));
  std::free(it->second.data);
  used_ -= bytes_for(it->second.cap);
  seqs_.erase(it);
}

void KvCache::prepare(int id, int64_t start, int64_t n, int64_t ctx_len, bool write) {
  Seq& s = seqs_.at(id);
  int64_t need = ctx_len > start + n ? ctx_len : std::min(ctx_len, start);  // end of the cached reads
  if (write) need = std::max(need, start);  // (no gap below a write: `ready` stays a prefix)
  need = std::min(need, s.cap);
  if (need <= s.ready) return;
  const int64_t row = (int64_t)hd_ * elem_, blk = n_kv_ * s.cap * row;
  for (int64_t b = 0; b < (int64_t)layers_ * 2; ++b)  // every layer's K and V, head by head
    for (int h = 0; h < n_kv_; ++h)
      std::memset(s.data + b * blk + (h * s.cap + s.ready) * row, 0, (size_t)((need - s.ready) * row));
  zero_filled_ += need - s.ready;
  s.ready = need;
}

void KvCache::written(int id, int64_t start, int64_t n) {
  Seq& s = seqs_.at(id);
  if (start <= s.ready) s.ready = std::max(s.ready, std::min(start + n, s.cap));
}

void* KvCache::block(int id, int layer, int kv) const {
  const Seq& s = seqs_.at(id);
  const int64_t blk = (int64_t)n_kv_ * s.cap * hd_ * elem_;
  return s.data + ((int64_t)layer * 2 + kv) * blk;
}

}  // namespace bitdlm
