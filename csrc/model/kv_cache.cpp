#include "model/kv_cache.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
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
  for (auto& b : pool_) std::free(b.second);
}

int KvCache::alloc(int64_t capacity) {
  if (capacity <= 0 || capacity > (1 << 30))
    throw std::invalid_argument("alloc_seq: capacity must be in [1, 2^30], got " + std::to_string(capacity));
  const int64_t need = bytes_for(capacity);
  // Not zeroed, fresh or kept (prepare zeroes what a forward would read unwritten).
  char* p = nullptr;
  int64_t bytes = need;
  auto it = pool_.lower_bound(need);  // the smallest kept block that holds it, if not much larger
  if (it != pool_.end() && it->first <= need + need / 4 && used_ + it->first <= budget_) {
    p = it->second;
    bytes = it->first;
    pooled_ -= bytes;
    pool_.erase(it);
  } else {
    if (used_ + need > budget_)
      throw KvBudgetError("KV cache budget exceeded: a sequence of capacity " + std::to_string(capacity) +
                          " needs " + std::to_string(need) + " bytes, " + std::to_string(budget_ - used_) + " of " +
                          std::to_string(budget_) + " bytes are free");
    while (used_ + pooled_ + need > budget_ && !pool_.empty()) {  // room from the kept blocks, largest first
      auto last = std::prev(pool_.end());
      std::free(last->second);
      pooled_ -= last->first;
      pool_.erase(last);
    }
    // Large blocks come from mmap, committed page by page as they are written: unused
    // capacity costs no RSS. (Transparent huge pages, MADV_HUGEPAGE on 2 MiB-aligned
    // blocks, cut the first burst's faults 35k -> 16k on the dev VM but made rope_kv 6x
    // slower there: the madvise-mode defrag compacts memory on the fault path.)
    p = static_cast<char*>(std::malloc((size_t)need));
    if (!p) throw KvBudgetError("KV cache: allocation of " + std::to_string(need) + " bytes failed");
  }
  const int id = next_id_++;  // ids are never reused: a stale id fails loudly
  seqs_[id] = Seq{p, capacity, bytes};
  used_ += bytes;
  return id;
}

void KvCache::free(int id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw std::out_of_range("free_seq: unknown sequence id " + std::to_string(id));
  pool_.emplace(it->second.bytes, it->second.data);  // kept for the next sequence (alloc)
  pooled_ += it->second.bytes;
  used_ -= it->second.bytes;
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
