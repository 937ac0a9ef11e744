// The one dispatch point: picks the ISA level from the CPU's features
// (cpuid on x86-64; HWCAP on Linux / sysctl on macOS on aarch64), overridable
// with BITDLM_ISA (a name of isa_name()), owns the ISA names, registers the
// GEMM kernel tables and owns the OpenMP parallelism (one parallel region per
// call; the ISA kernels are single-threaded tiles).
// Compiled WITHOUT ISA flags: it must run on any CPU of the target architecture.
#include <omp.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#include <cerrno>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <new>

#include "kernels/isa.h"
#include "kernels/isa_table.h"
#include "kernels/job_ranges.h"
#include "kernels/team_clock.h"

namespace bitdlm {

namespace {

// A level's name and why this machine cannot run it (nullptr: it can).
struct Level {
  const char* name;
  const char* (*unsupported)();
};

const char* why_any() { return nullptr; }

#if defined(__x86_64__)

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx512vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }

const char* why_avx2() { return has_avx2() ? nullptr : "cpuid has no AVX2/FMA/F16C"; }
const char* why_avx512() { return has_avx512() ? nullptr : "cpuid has no AVX-512 F/BW/VL/DQ"; }
const char* why_avx512vnni() { return has_avx512vnni() ? nullptr : "cpuid has no AVX-512 VNNI"; }

// AMX: cpuid leaf 7 EDX bit 24 (AMX-TILE) and 25 (AMX-INT8), then Linux must
// grant this process the XTILEDATA state (arch_prctl(ARCH_REQ_XCOMP_PERM));
// without it the first tile instruction faults. Asked once per process.
const char* why_amx() {
  if (!has_avx512vnni()) return "cpuid has no AVX-512 VNNI (needed beside AMX)";
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 25)))
    return "cpuid has no AMX-INT8";
  static const std::string refused = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return std::string();
    return std::string("Linux refused AMX state (arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA): ") +
           std::strerror(errno) + ")";
  }();
  return refused.empty() ? nullptr : refused.c_str();
}

// Worst to best, in Isa order.
const Level kLevels[] = {{"scalar", &why_any},         {"avx2", &why_avx2}, {"avx512", &why_avx512},
                         {"avx512vnni", &why_avx512vnni}, {"amx", &why_amx}};

const IsaTable<KernelTable>& kernel_tables() {
  static const IsaTable<KernelTable> t{{Isa::kScalar, &kScalarKernels},
                                       {Isa::kAvx2, &kAvx2Kernels},
                                       {Isa::kAvx512, &kAvx512Kernels},
                                       {Isa::kAvx512Vnni, &kAvx512VnniKernels},
                                       {Isa::kAmx, &kAmxKernels}};
  return t;
}

#elif defined(__aarch64__)

// Advanced SIMD is part of ARMv8-A (every aarch64 CPU has it); SDOT and SMMLA
// are optional: Linux reports them in the aux vector, macOS in sysctl.
#if defined(__linux__)
bool has_dotprod() { return getauxval(AT_HWCAP) & (1ul << 20); }  // HWCAP_ASIMDDP
bool has_i8mm() { return getauxval(AT_HWCAP2) & (1ul << 13); }    // HWCAP2_I8MM
#elif defined(__APPLE__)
bool sysctl_flag(const char* name) {
  int v = 0;
  size_t n = sizeof v;
  return sysctlbyname(name, &v, &n, nullptr, 0) == 0 && v != 0;
}
bool has_dotprod() { return sysctl_flag("hw.optional.arm.FEAT_DotProd"); }
bool has_i8mm() { return sysctl_flag("hw.optional.arm.FEAT_I8MM"); }
#else
bool has_dotprod() { return false; }
bool has_i8mm() { return false; }
#endif

const char* why_dotprod() { return has_dotprod() ? nullptr : "the CPU reports no dot product (asimddp)"; }
const char* why_i8mm() {
  return !has_dotprod() ? "the CPU reports no dot product (asimddp)"
                        : has_i8mm() ? nullptr : "the CPU reports no int8 matrix multiply (i8mm)";
}

const Level kLevels[] = {{"scalar", &why_any}, {"neon", &why_any}, {"dotprod", &why_dotprod}, {"i8mm", &why_i8mm}};

const IsaTable<KernelTable>& kernel_tables() {
  static const IsaTable<KernelTable> t{{Isa::kScalar, &kScalarKernels},
                                       {Isa::kNeon, &kNeonKernels},
                                       {Isa::kDotprod, &kDotprodKernels},
                                       {Isa::kI8mm, &kI8mmKernels}};
  return t;
}

#else

const Level kLevels[] = {{"scalar", &why_any}};

const IsaTable<KernelTable>& kernel_tables() {
  static const IsaTable<KernelTable> t{{Isa::kScalar, &kScalarKernels}};
  return t;
}

#endif

constexpr int kNum = (int)(sizeof kLevels / sizeof kLevels[0]);
static_assert(kNum == (int)Isa::kNumIsa, "one name per Isa level");

std::string supported_list() {
  std::string sup;
  for (auto& n : supported_isas()) sup += (sup.empty() ? "" : ", ") + n;
  return sup;
}

int find(const std::string& name) {
  std::string known;
  for (int i = 0; i < kNum; ++i) {
    if (name == kLevels[i].name) {
      if (const char* why = kLevels[i].unsupported())
        throw std::invalid_argument("ISA '" + name + "' is not supported by this CPU (" + why +
                                    "; supported: " + supported_list() + ")");
      return i;
    }
    known += (known.empty() ? "" : "|") + std::string(kLevels[i].name);
  }
  throw std::invalid_argument("unknown ISA '" + name + "' (expected " + known + ")");
}

int pick() {
  const char* env = std::getenv("BITDLM_ISA");
  if (env && *env) {
    try {
      return find(env);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(std::string("BITDLM_ISA: ") + e.what());
    }
  }
  int best = 0;
  for (int i = 0; i < kNum; ++i)
    if (!kLevels[i].unsupported()) best = i;
  return best;
}

std::atomic<int> g_isa{-1};

int isa_index() {
  int i = g_isa.load(std::memory_order_acquire);
  if (i < 0) {
    i = pick();  // throws on a bad BITDLM_ISA, again at every call
    g_isa.store(i, std::memory_order_release);
  }
  return i;
}

const KernelTable& table() { return kernel_tables().active(); }

// Below this many multiply-accumulates a call runs on one thread: waking the
// team costs more than it saves.
constexpr int64_t kParallelMacs = int64_t(1) << 21;

}  // namespace

const char* isa_name(Isa isa) { return kLevels[(int)isa].name; }

Isa isa_level(const std::string& name) { return (Isa)find(name); }

const char* active_isa() { return kLevels[isa_index()].name; }

Isa active_isa_id() { return (Isa)isa_index(); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Level& l : kLevels)
    if (!l.unsupported()) out.push_back(l.name);
  return out;
}

static std::atomic<int> g_amx_min{0};  // 0: not read yet

int amx_min_tokens() {
  // Tunable for measurements (bench/kernels.py, bench/amx_sweep.py); below it the VNNI GEMV runs.
  int n = g_amx_min.load(std::memory_order_relaxed);
  if (n == 0) {
    const char* e = std::getenv("BITDLM_AMX_MIN_TOKENS");
    const int v = e && *e ? std::atoi(e) : 0;
    n = v > 0 ? v : kAmxMinTokens;
    int expected = 0;
    if (!g_amx_min.compare_exchange_strong(expected, n)) n = expected;
  }
  return n;
}

void set_amx_min_tokens(int n) {
  if (n < 1) throw std::invalid_argument("AMX min tokens must be >= 1, got " + std::to_string(n));
  g_amx_min.store(n, std::memory_order_relaxed);
}

// The AMX ternary tile kernel and its job height: the shipped kernel, or a
// bench build's variant (set_amx_ternary_kernel, isa.h). Plain data read once
// per call; the product never changes them.
static AmxTernaryFn g_amx_bench_fn = nullptr;
static int g_amx_rows = kAmxRowBlock;

void set_amx_ternary_kernel(AmxTernaryFn fn, int rows) {
  if (fn && (rows < 16 || rows > 128 || rows % 16))
    throw std::invalid_argument("AMX job rows must be a multiple of 16 in 16..128");
  g_amx_bench_fn = fn;
  g_amx_rows = fn ? rows : kAmxRowBlock;
}

void set_isa(const std::string& name) { g_isa.store(find(name), std::memory_order_release); }

void quantize_act(const float* x, int N, int K, int Kp, int8_t* q, float* scale, int32_t* sum) {
  table().quantize(x, N, K, Kp, q, scale, sum);
}

// Ternary multi-GEMM. Jobs = (matrix, block of kRowBlock rows, chunk of
// kTokChunk tokens); prefill (large N) is split over tokens as well, so small
// matrices still give every thread work. Jobs are handed out dynamically: on a
// shared machine a descheduled thread then delays the call by at most one job
// instead of its whole static share (measured: static 2-thread calls stalled
// for whole 24 ms scheduler slices under load). The job list is cut into one
// contiguous range per thread (JobRanges): a thread takes its own range's jobs
// in order, then the rest of the others'; so each thread streams one stretch
// of the weights (its tiles' prefetch runs on into its next job) instead of
// 20 KB pieces scattered between the threads, and a descheduled thread's jobs
// are still taken by the others.
// AMX path: the activations are re-laid out into VNNI tiles first (in the same
// parallel region, split over (token group, k step) tiles, then a barrier);
// every thread configures its tiles once, runs its jobs and releases them.
static thread_local int8_t* t_vnni = nullptr;
static thread_local size_t t_vnni_cap = 0;

// The calling thread's buffer for amx_act's tiles of a (ceil(N/16)*16 x Kp bytes).
static int8_t* vnni_buffer(const ActQ& a) {
  const size_t need = (size_t)((a.N + 15) / 16) * 16 * a.Kp;
  if (need > t_vnni_cap) {
    std::free(t_vnni);
    t_vnni = (int8_t*)std::aligned_alloc(64, (need + 63) / 64 * 64);
    if (!t_vnni) {
      t_vnni_cap = 0;
      throw std::bad_alloc();
    }
    t_vnni_cap = need;
  }
  return t_vnni;
}

static void run_ternary(const TernaryW* ws, int n_ws, const ActQ& a, int32_t* out_i32) {
  const KernelTable& t = table();
  const bool amx = t.amx_ternary && a.N >= amx_min_tokens();
  const AmxTernaryFn amx_fn = g_amx_bench_fn ? g_amx_bench_fn : t.amx_ternary;
  const int kRowBlock = amx ? g_amx_rows : 32;
  constexpr int kTokChunk = 64;  // a multiple of 16 (AMX token tiles)
  const int n_chunks = (a.N + kTokChunk - 1) / kTokChunk;
  int64_t total = 0, macs = 0;
  for (int i = 0; i < n_ws; ++i) {
    total += (int64_t)((ws[i].M + kRowBlock - 1) / kRowBlock) * n_chunks;
    macs += (int64_t)ws[i].M * a.N * a.Kp;
  }
  const int groups = (a.N + 15) / 16, steps = a.Kp / 64;
  int8_t* const vb = amx ? vnni_buffer(a) : nullptr;
  const bool par = macs >= kParallelMacs && omp_get_max_threads() > 1 && !omp_in_parallel();
  const int team = par ? omp_get_max_threads() : 1;
  JobRanges ranges(total, team);
  TeamClock clock(kTeamTernary, team);
#pragma omp parallel if (par)
  {
    clock.enter(omp_get_thread_num());
    if (amx) {
#pragma omp for schedule(static)
      for (int i = 0; i < groups * steps; ++i) t.amx_act(a, i / steps, i % steps, vb);
      t.amx_begin();
    }
    auto run_job = [&](int64_t job) {
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
      if (amx)
        amx_fn(ws[i], a, vb, m0, m1, n0, n1, out_i32);
      else
        t.ternary(ws[i], a, m0, m1, n0, n1, out_i32);
    };
    ranges.run(omp_get_thread_num(), run_job);
    if (amx) t.amx_end();
    clock.done(omp_get_thread_num());
  }
  clock.finish();
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
  const int team = par ? omp_get_max_threads() : 1;
  JobRanges ranges(nb, team);
  TeamClock clock(kTeamLmHead, team);
#pragma omp parallel if (par)
  {
    clock.enter(omp_get_thread_num());
    ranges.run(omp_get_thread_num(), [&](int64_t b) { f((int)b * kRowBlock, std::min(M, ((int)b + 1) * kRowBlock)); });
    clock.done(omp_get_thread_num());
  }
  clock.finish();
}

void gemm_f16_f32(const uint16_t* W, int M, int K, const float* x, int N, float* y, int ldy) {
  const KernelTable& t = table();
  run_rows(M, (int64_t)M * K * N, [&](int m0, int m1) { t.f16(W, K, x, N, y, ldy, m0, m1); });
}

// int8 lm_head. With AMX, from kAmxLmHeadMinTokens tokens (decode streams the
// matrix faster on the VNNI kernel since its session-5 rewrite): activations
// re-laid out into tiles (as for the ternary GEMM), then 256-row jobs on
// TDPBSSD tiles; the last M % 16 rows (and any K that is not a multiple of 64)
// take the VNNI kernel, which gives the same int32 dots.
void gemm_i8_i8(const int8_t* W, const float* wscale, int M, int K, const ActQ& a, float* y, int ldy) {
  const KernelTable& t = table();
  const bool amx = t.amx_i8 && a.N >= kAmxLmHeadMinTokens && K % 64 == 0 && M >= 16;
  if (!amx) {
    run_rows(M, (int64_t)M * K * a.N, [&](int m0, int m1) { t.i8(W, wscale, K, a, y, ldy, m0, m1); });
    return;
  }
  // 256-row jobs (8 groups of 32): the kernel prefetches each next group of its
  // job while the current one multiplies (501 jobs for a 128256-row vocabulary)
  constexpr int kRowBlock = 256;
  const int m16 = M / 16 * 16, nb = (M + kRowBlock - 1) / kRowBlock;
  const int groups = (a.N + 15) / 16, steps = a.Kp / 64;
  int8_t* const vb = vnni_buffer(a);
  const bool par = (int64_t)M * K * a.N >= kParallelMacs && omp_get_max_threads() > 1 && !omp_in_parallel();
  const int team = par ? omp_get_max_threads() : 1;
  JobRanges lm_ranges(nb, team);
  TeamClock clock(kTeamLmHead, team);
#pragma omp parallel if (par)
  {
    clock.enter(omp_get_thread_num());
#pragma omp for schedule(static)
    for (int i = 0; i < groups * steps; ++i) t.amx_act(a, i / steps, i % steps, vb);
    t.amx_begin();
    lm_ranges.run(omp_get_thread_num(), [&](int64_t job) {
      const int m0 = (int)job * kRowBlock, m1 = std::min(M, m0 + kRowBlock), me = std::min(m1, m16);
      if (me > m0) t.amx_i8(W, wscale, K, a, vb, y, ldy, m0, me);
      if (m1 > me) t.i8(W, wscale, K, a, y, ldy, std::max(m0, me), m1);
    });
    t.amx_end();
    clock.done(omp_get_thread_num());
  }
  clock.finish();
}

}  // namespace bitdlm
