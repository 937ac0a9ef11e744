// JobRanges: how a parallel region shares a list of jobs (dispatch.cpp's GEMMs,
// model/attention.cpp's units). Each thread takes its own contiguous range of
// the list in order, then steals what is left of the others' one job at a
// time: neighbouring jobs (consecutive rows of a weight matrix, consecutive
// keys of a cache) stay on one thread, whose prefetches run on into its next
// job, while a descheduled thread delays the call by at most one job.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

namespace bitdlm {

// Per-thread cursors over contiguous ranges of a call's jobs [0, total): range i is
// [total * i / n, total * (i + 1) / n), n = the most threads the call may get.
class JobRanges {
 public:
  JobRanges(int64_t total, int n) : total_(total), n_(n), next_(new Cursor[n]) {
    for (int i = 0; i < n; ++i) next_[i].v.store(begin(i), std::memory_order_relaxed);
  }
  // f(job) for every job, range `self` first, then the others' leftovers; every job runs once
  // over all callers (a range's cursor hands out each of its jobs to one fetch_add).
  template <class F>
  void run(int self, F&& f) {
    for (int k = 0; k < n_; ++k) {
      const int i = (self + k) % n_;
      const int64_t end = begin(i + 1);
      for (int64_t j; (j = next_[i].v.fetch_add(1, std::memory_order_relaxed)) < end;) f(j);
    }
  }

 private:
  struct alignas(64) Cursor {
    std::atomic<int64_t> v;
  };
  int64_t begin(int i) const { return total_ * i / n_; }
  int64_t total_;
  int n_;
  std::unique_ptr<Cursor[]> next_;
};

}  // namespace bitdlm
