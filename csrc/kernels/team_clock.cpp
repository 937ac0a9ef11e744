#include "kernels/team_clock.h"

#include <mutex>

namespace bitdlm {

const char* const kTeamKindNames[kNumTeamKinds] = {"ternary_gemm", "lm_head", "attention"};
std::atomic<bool> g_team_clock_on{false};

namespace {
std::mutex g_mu;
TeamStats g_stats[kNumTeamKinds];
}  // namespace

void set_team_profile(bool on) { g_team_clock_on.store(on, std::memory_order_relaxed); }

std::vector<TeamStats> team_profile(bool reset) {
  std::lock_guard<std::mutex> g(g_mu);
  std::vector<TeamStats> out(g_stats, g_stats + kNumTeamKinds);
  if (reset)
    for (auto& s : g_stats) s = TeamStats{};
  return out;
}

void team_add(TeamKind kind, const TeamStats& s) {
  std::lock_guard<std::mutex> g(g_mu);
  TeamStats& t = g_stats[kind];
  t.calls += s.calls;
  t.wall += s.wall;
  t.fork += s.fork;
  t.work += s.work;
  t.imbalance += s.imbalance;
  t.join += s.join;
  t.threads += s.threads;
}

}  // namespace bitdlm
