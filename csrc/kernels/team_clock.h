// TeamClock: where a parallel region's time goes besides its work, when profiling is on
// (`_core.set_team_profile`, which Model.set_profile / BITDLM_PROFILE turn on with the phase
// profile). Per region, four parts that add up to its wall time: the fork (region start to a
// thread's start, mean over the team), the work (a thread's own range and what it stole, mean),
// the imbalance (last thread done - mean thread done) and the join (region end - last done).
// A 16-thread GEMM at half a core's efficiency is either slower work per thread or time
// outside it: this tells which (bench/forward.py prints it).
// Off, a region pays one relaxed load.
#pragma once
#include <omp.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace bitdlm {

enum TeamKind { kTeamTernary, kTeamLmHead, kTeamAttention, kNumTeamKinds };
extern const char* const kTeamKindNames[kNumTeamKinds];

struct TeamStats {
  int64_t calls = 0;
  double wall = 0, fork = 0, work = 0, imbalance = 0, join = 0, threads = 0;  // seconds (threads: summed)
};

extern std::atomic<bool> g_team_clock_on;
void set_team_profile(bool on);
// Totals per kind since the last reset; reset: zero them after reading.
std::vector<TeamStats> team_profile(bool reset);
void team_add(TeamKind kind, const TeamStats& s);

// One region's clock: construct before the `omp parallel`, enter(tid) first thing in it,
// done(tid) after the thread's jobs, finish() after the region (on the calling thread).
class TeamClock {
 public:
  TeamClock(TeamKind kind, int max_threads)
      : on_(g_team_clock_on.load(std::memory_order_relaxed)), kind_(kind) {
    if (!on_) return;
    start_.assign(max_threads, -1.0);
    end_.assign(max_threads, -1.0);
    t0_ = omp_get_wtime();
  }
  void enter(int tid) {
    if (on_ && tid < (int)start_.size()) start_[tid] = omp_get_wtime();
  }
  void done(int tid) {
    if (on_ && tid < (int)end_.size()) end_[tid] = omp_get_wtime();
  }
  void finish() {
    if (!on_) return;
    const double t1 = omp_get_wtime();
    TeamStats s;
    s.calls = 1;
    s.wall = t1 - t0_;
    double last_end = t0_, sum_start = 0, sum_end = 0;
    int n = 0;
    for (std::size_t i = 0; i < start_.size(); ++i) {
      if (start_[i] < 0 || end_[i] < 0) continue;  // (a team smaller than max_threads)
      ++n;
      last_end = end_[i] > last_end ? end_[i] : last_end;
      sum_start += start_[i];
      sum_end += end_[i];
    }
    if (n) {
      s.fork = sum_start / n - t0_;
      s.work = (sum_end - sum_start) / n;
      s.imbalance = last_end - sum_end / n;
      s.join = t1 - last_end;
      s.threads = n;
    }
    team_add(kind_, s);
  }

 private:
  bool on_;
  TeamKind kind_;
  double t0_ = 0;
  std::vector<double> start_, end_;
};

}  // namespace bitdlm
