// Per-sequence KV caches with a byte budget.
#pragma once
#include <cstdint>
#include <map>
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

  // A freed sequence's block is kept for the next sequence of about its size (at most 1.25x):
  // its pages stay committed, so a server's next requests write their K / V without page
  // faults (a fresh block faults every 4 KiB page on its first write: on the dev VM, 16
  // requests of 64 positions of the 2B shape, 35k faults, 6.8 ms a step of rope_kv) and no
  // munmap interrupts the threads of a running forward. Blocks, live and kept, count against
  // the budget at their real size; kept ones are released when a new block needs their room.
  int alloc(int64_t capacity);  // -> seq id; throws KvBudgetError / std::invalid_argument
  void free(int id);            // throws std::out_of_range for unknown ids
  // A sequence's memory is not zeroed at alloc (a memset of the whole capacity per
  // request cost more than the engine's step); instead positions [0, ready) are
  // known to be written or zeroed. Before a forward, `prepare` zeroes what the item
  // would read past `ready` (cached [0, min(ctx_len, start)) and [start + n, ctx_len);
  // with a write, also the gap [ready, start)), so a read sees zeros where nothing was
  // written, as with calloc; after the forward, `written` marks a write's positions.
  // The engine reads only what it wrote: nothing is zeroed there (zero_filled() stays 0).
  void prepare(int id, int64_t start, int64_t n, int64_t ctx_len, bool write);
  void written(int id, int64_t start, int64_t n);
  int64_t zero_filled() const { return zero_filled_; }  // positions zeroed by prepare, all sequences
  bool has(int id) const { return seqs_.count(id) != 0; }
  int64_t capacity(int id) const { return seqs_.at(id).cap; }
  // This layer's K or V block [n_kv, cap, head_dim] of sequence id.
  void* k(int id, int layer) const { return block(id, layer, 0); }
  void* v(int id, int layer) const { return block(id, layer, 1); }
  int64_t bytes_used() const { return used_; }      // live sequences' blocks
  int64_t bytes_kept() const { return pooled_; }     // freed blocks kept for reuse
  int64_t budget() const { return budget_; }
  int64_t bytes_for(int64_t capacity) const { return capacity * per_pos_; }
  bool f16() const { return f16_; }
  int num_seqs() const { return (int)seqs_.size(); }

 private:
  struct Seq {
    char* data;
    int64_t cap;
    int64_t bytes;      // the block's size (>= bytes_for(cap) when a kept block was reused)
    int64_t ready = 0;  // positions [0, ready) written or zeroed
  };
  void* block(int id, int layer, int kv) const;
  int layers_, n_kv_, hd_;
  bool f16_;
  int64_t elem_, per_pos_, budget_, used_ = 0, pooled_ = 0;
  std::multimap<int64_t, char*> pool_;  // kept blocks by size
  int next_id_ = 0;
  int64_t zero_filled_ = 0;
  std::unordered_map<int, Seq> seqs_;
};

}  // namespace bitdlm
