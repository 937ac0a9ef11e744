// Per-sequence KV caches with a byte budget.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <unordered_map>

namespace bitdlm {

// Raised when a cache would exceed the budget (Python: MemoryError subclass).
struct KvBudgetError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class KvCache {
 public:
  KvCache(int layers, int n_kv, int head_dim, bool f16, int64_t budget_bytes);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  int alloc(int64_t capacity);  // -> seq id; throws KvBudgetError / std::invalid_argument
  void free(int id);            // throws std::out_of_range for unknown ids
  bool has(int id) const { return seqs_.count(id) != 0; }
  int64_t capacity(int id) const { return seqs_.at(id).cap; }
  // This layer's K or V block [n_kv, cap, head_dim] of sequence id.
  void* k(int id, int layer) const { return block(id, layer, 0); }
  void* v(int id, int layer) const { return block(id, layer, 1); }
  int64_t bytes_used() const { return used_; }
  int64_t budget() const { return budget_; }
  int64_t bytes_for(int64_t capacity) const { return capacity * per_pos_; }
  bool f16() const { return f16_; }
  int num_seqs() const { return (int)seqs_.size(); }

 private:
  struct Seq {
    char* data;
    int64_t cap;
  };
  void* block(int id, int layer, int kv) const;
  int layers_, n_kv_, hd_;
  bool f16_;
  int64_t elem_, per_pos_, budget_, used_ = 0;
  int next_id_ = 0;
  std::unordered_map<int, Seq> seqs_;
};

}  // namespace bitdlm
