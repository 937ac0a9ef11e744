// The one dispatch point: picks a kernel table from cpuid, overridable with
// BITDLM_ISA=scalar|avx2|avx512|avx512vnni, and owns the OpenMP parallelism
// (one parallel region per call; the ISA kernels are single-threaded tiles).
// Compiled WITHOUT ISA flags: it must run on any x86-64 CPU.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/isa.h"

namespace bitdlm {

namespace {

struct Candidate {
  const KernelTable* table;
  bool (*supported)();
};

bool cpu_any() { return true; }
bool cpu_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_avx512() {
  __builtin_cpu_init();
  return cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_avx512vnni() {
  __builtin_cpu_init();
  return cpu_avx512() && __builtin_cpu_supports("avx512vnni");
}

// Worst to best.
const Candidate kCandidates[] = {
    {&kScalarKernels, &cpu_any},
    {&kAvx2Kernels, &cpu_avx2},
    {&kAvx512Kernels, &cpu_avx512},
    {&kAvx512VnniKernels, &cpu_avx512vnni},
};

const KernelTable* find(const std::string& name) {
  std::string known;
  for (const Candidate& c : kCandidates) {
    if (name == c.table->name) {
      if (!c.supported())
        throw std::invalid_argument("ISA '" + name + "' is not supported by this CPU (supported: " +
                                    [] {
                                      std::string s;
                                      for (auto& n : supported_isas()) s += (s.empty() ? "" : ", ") + n;
                                      return s;
                                    }() +
                                    ")");
      return c.table;
    }
    known += (known.empty() ? "" : "|") + std::string(c.table->name);
  }
  throw std::invalid_argument("unknown ISA '" + name + "' (expected " + known + ")");
}

const KernelTable* pick_table() {
  const char* env = std::getenv("BITDLM_ISA");
  if (env && *env) {
    try {
      return find(env);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(std::string("BITDLM_ISA: ") + e.what());
    }
  }
  const KernelTable* best = &kScalarKernels;
  for (const Candidate& c : kCandidates)
    if (c.supported()) best = c.table;
  return best;
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = pick_table();  // throws on a bad BITDLM_ISA, again at every call
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

// Below this many multiply-accumulates a call runs on one thread: waking the
// team costs more than it saves.
constexpr int64_t kParallelMacs = int64_t(1) << 21;

}  // namespace

const char* active_isa() { return table().name; }

Isa active_isa_id() {
  const KernelTable* t = &table();
  if (t == &kAvx512VnniKernels) return Isa::kAvx512Vnni;
  if (t == &kAvx512Kernels) return Isa::kAvx512;
  if (t == &kAvx2Kernels) return Isa::kAvx2;
  return Isa::kScalar;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Candidate& c : kCandidates)
    if (c.supported()) out.push_back(c.table->name);
  return out;
}

void set_isa(const std::string& name) { g_table.store(find(name), std::memory_order_release); }

void quantize_act(const float* x, int N, int K, int Kp, int8_t* q, float* scale, int32_t* sum) {
  const KernelTable& t = table();
  // AVX-512 tables reuse the AVX2 quantizer (every AVX-512 CPU has AVX2)
  const auto fn = t.quantize ? t.quantize : (cpu_avx2() ? kAvx2Kernels.quantize : kScalarKernels.quantize);
  fn(x, N, K, Kp, q, scale, sum);
}

// Ternary multi-GEMM. Jobs = (matrix, block of kRowBlock rows, chunk of
// kTokChunk tokens); prefill (large N) is split over tokens as well, so small
// matrices still give every thread work. Jobs are handed out dynamically: on a
// shared machine a descheduled thread then delays the call by at most one job
// instead of its whole static share (measured: static 2-thread calls stalled
// for whole 24 ms scheduler slices under load).
static void run_ternary(const TernaryW* ws, int n_ws, const ActQ& a, int32_t* out_i32) {
  const KernelTable& t = table();
  constexpr int kRowBlock = 32;
  constexpr int kTokChunk = 64;
  const int n_chunks = (a.N + kTokChunk - 1) / kTokChunk;
  int64_t total = 0, macs = 0;
  for (int i = 0; i < n_ws; ++i) {
    total += (int64_t)((ws[i].M + kRowBlock - 1) / kRowBlock) * n_chunks;
    macs += (int64_t)ws[i].M * a.N * a.Kp;
  }
  const bool par = macs >= kParallelMacs && omp_get_max_threads() > 1 && !omp_in_parallel();
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int64_t job = 0; job < total; ++job) {
    int64_t j = job;
    int i = 0;
    for (;;) {
      const int64_t nj = (int64_t)((ws[i].M + kRowBlock - 1) / kRowBlock) * n_chunks;
      if (j < nj) break;
      j -= nj;
      ++i;
    }
    const int rb = (int)(j / n_chunks), tc = (int)(j % n_chunks);
    const int m0 = rb * kRowBlock, m1 = std::min(ws[i].M, m0 + kRowBlock);
    const int n0 = tc * kTokChunk, n1 = std::min(a.N, n0 + kTokChunk);
    t.ternary(ws[i], a, m0, m1, n0, n1, out_i32);
  }
}

void gemm_i2_i8(const TernaryW* ws, int n_ws, const ActQ& a) { run_ternary(ws, n_ws, a, nullptr); }

void gemm_i2_i8_i32(const uint8_t* W, int M, const ActQ& a, int32_t* out) {
  TernaryW w{W, M, 1.f, nullptr, 0};
  run_ternary(&w, 1, a, out);
}

// lm_head GEMMs: parallel over blocks of vocabulary rows; each job handles all
// N tokens so the (large) weight matrix is streamed from memory once.
template <class F>
static void run_rows(int M, int64_t macs, F&& f) {
  constexpr int kRowBlock = 64;
  const int nb = (M + kRowBlock - 1) / kRowBlock;
  const bool par = macs >= kParallelMacs && omp_get_max_threads() > 1 && !omp_in_parallel();
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int b = 0; b < nb; ++b) f(b * kRowBlock, std::min(M, (b + 1) * kRowBlock));
}

void gemm_f16_f32(const uint16_t* W, int M, int K, const float* x, int N, float* y, int ldy) {
  const KernelTable& t = table();
  run_rows(M, (int64_t)M * K * N, [&](int m0, int m1) { t.f16(W, K, x, N, y, ldy, m0, m1); });
}

void gemm_i8_i8(const int8_t* W, const float* wscale, int M, int K, const ActQ& a, float* y, int ldy) {
  const KernelTable& t = table();
  run_rows(M, (int64_t)M * K * a.N, [&](int m0, int m1) { t.i8(W, wscale, K, a, y, ldy, m0, m1); });
}

}  // namespace bitdlm
