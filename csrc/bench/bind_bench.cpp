// Python bindings of the bench-only kernels (BITDLM_BENCH_KERNELS builds:
// bench/kernels.py's machine ceilings, bench/amx_sweep.py's AMX variants and
// wide-token VNNI kernels).
// The shipped module has none of these.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/amx_variants.h"
#include "bind_arrays.h"
#include "kernels/bind_multi.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "model/smallops.h"

namespace py = pybind11;

namespace bitdlm {

// bench_avx2.cpp (AVX2 flags): only called when the CPU has AVX2.
double bench_peak_int8_avx2(int threads, int64_t iters);
double bench_read_bw_avx2(const uint8_t* buf, size_t bytes, int threads, int reps);
double bench_peak_fma_avx2(int threads, int64_t iters);

// bench_avx512vnni.cpp / bench_amx.cpp: only called when that ISA is supported.
double bench_peak_vnni(int threads, int64_t iters);
double bench_peak_fma_avx512(int threads, int64_t iters);
double bench_peak_amx(int threads, int64_t iters);

static void require_isa(const char* isa) {
  for (const auto& n : supported_isas())
    if (n == isa) return;
  throw std::runtime_error(std::string("this benchmark needs the '") + isa + "' ISA, which this CPU cannot run");
}

static void require_avx2() {
  for (const auto& n : supported_isas())
    if (n == "avx2") return;
  throw std::runtime_error("the machine benchmarks need an AVX2 CPU");
}

// A machine-ceiling kernel as a binding: its ISA requirement, the argument
// check, the kernel with the GIL released.
template <class Require>
static auto peak_binding(Require require, double (*peak)(int, int64_t)) {
  return [require, peak](int threads, int64_t iters) {
    require();
    if (threads < 1 || iters < 1) throw std::invalid_argument("threads and iters must be >= 1");
    py::gil_scoped_release nogil;
    return peak(threads, iters);
  };
}

// bench_rows.cpp: the small-op row drivers timed alone (seconds per call, one per rep).
std::vector<double> bench_rows(const SmallOps& t, int op, int N, int K, int threads, int reps, bool gemm_layout);

// amx_keepcfg_amx.cpp: configure this thread's tiles unless they still are.
void bench_amx_ensure_tiles();

// bench_gemm_multi's kernels: the shipped VNNI tiles (amx < 0), or the shipped AMX
// kernel through dispatch's AMX loop with per-call cost options (amx bits:
// 1 = tile config kept across calls, 2 = activation re-layout on the calling
// thread before the parallel region, no barrier inside it).
struct BenchKernel {
  const char* name;
  int amx;
};
constexpr BenchKernel kBenchKernels[] = {
    {"vnni", -1}, {"amx", 0}, {"amx_keepcfg", 1}, {"amx_serialact", 2}, {"amx_keepcfg_serialact", 3},
};

static const BenchKernel& bench_kernel(const std::string& name) {
  std::string known;
  for (const auto& k : kBenchKernels) {
    if (name == k.name) return k;
    known += (known.empty() ? "" : ", ") + std::string(k.name);
  }
  throw std::invalid_argument("bench kernel: one of " + known + "; got '" + name + "'");
}

// dispatch.cpp's job loop (matrix x row block x 64-token chunk, dynamic
// schedule, serial below 2M MACs) with the bench kernel k, so the shipped and
// the bench kernels are timed through the same driver. AMX: 64-row jobs and
// the shipped kernel's re-layout / tile config, changed only by k.amx's bits.
static thread_local int8_t* t_bench_vb = nullptr;
static thread_local size_t t_bench_cap = 0;

static void bench_ternary_multi(const BenchKernel& k, const TernaryW* ws, int n_ws, const ActQ& a) {
  const bool amx = k.amx >= 0, keep = amx && (k.amx & 1), serial_act = amx && (k.amx & 2);
  const auto fn = amx ? nullptr : kAvx512VnniKernels.ternary;
  const KernelTable& t = kAmxKernels;
  const int kRows = amx ? kAmxRowBlock : 32, kTok = 64;
  const int n_chunks = (a.N + kTok - 1) / kTok;
  std::vector<int> first(n_ws + 1, 0);
  int64_t macs = 0;
  for (int i = 0; i < n_ws; ++i) {
    first[i + 1] = first[i] + (ws[i].M + kRows - 1) / kRows * n_chunks;
    macs += (int64_t)ws[i].M * a.N * a.Kp;
  }
  const int groups = (a.N + 15) / 16, steps = a.Kp / 64;
  int8_t* vb = nullptr;
  if (amx) {
    const size_t need = (size_t)groups * 16 * a.Kp;
    if (need > t_bench_cap) {
      std::free(t_bench_vb);
      t_bench_vb = (int8_t*)std::aligned_alloc(64, (need + 63) / 64 * 64);
      t_bench_cap = t_bench_vb ? need : 0;
      if (!t_bench_vb) throw std::bad_alloc();
    }
    vb = t_bench_vb;
    if (serial_act)
      for (int i = 0; i < groups * steps; ++i) t.amx_act(a, i / steps, i % steps, vb);
  }
  const bool par = macs >= (int64_t(1) << 21) && omp_get_max_threads() > 1;
#pragma omp parallel if (par)
  {
    if (amx) {
      if (!serial_act) {
#pragma omp for schedule(static)
        for (int i = 0; i < groups * steps; ++i) t.amx_act(a, i / steps, i % steps, vb);
      }
      if (keep)
        bench_amx_ensure_tiles();
      else
        t.amx_begin();
    }
    // (one shared counter, as the product until session 14; it now uses JobRanges: compare
    // the variants with each other here, the product with bench/gemm_ab.py)
#pragma omp for schedule(dynamic, 1) nowait
    for (int job = 0; job < first[n_ws]; ++job) {
      int i = 0;
      while (job >= first[i + 1]) ++i;
      const int j = job - first[i], m0 = j / n_chunks * kRows, n0 = j % n_chunks * kTok;
      const int m1 = std::min(ws[i].M, m0 + kRows), n1 = std::min(a.N, n0 + kTok);
      if (amx)
        t.amx_ternary(ws[i], a, vb, m0, m1, n0, n1, nullptr);
      else
        fn(ws[i], a, m0, m1, n0, n1, nullptr);
    }
    if (amx && !keep) t.amx_end();
  }
}

// What run_ternary's AMX path costs per call besides its jobs, on `threads`
// threads for N tokens x Kp (issue 19: AMX took ~15 us more per call than the
// VNNI GEMV in K1). Each stage is timed as a whole parallel region, mean us
// over `reps` calls: fork (empty region = OpenMP fork + join), cfg (+ every
// thread's amx_begin / amx_end: tile config and release), act (+ the
// activation re-layout, split over threads, and its barrier), all (both, =
// the prologue and epilogue of one AMX GEMM call without its jobs).
static py::dict amx_overheads(int threads, int N, int Kp, int reps) {
  const KernelTable& t = kAmxKernels;
  const int groups = (N + 15) / 16, steps = Kp / 64;
  std::vector<int8_t> q((size_t)N * Kp, 3);
  std::vector<float> sc(N, 1.f);
  std::vector<int32_t> sum(N, 0);
  const ActQ a{q.data(), sc.data(), sum.data(), N, Kp};
  const size_t bytes = (size_t)groups * 16 * Kp;
  int8_t* vb = (int8_t*)std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!vb) throw std::bad_alloc();
  auto region = [&](bool cfg, bool act) {
    const double t0 = omp_get_wtime();
    for (int r = 0; r < reps; ++r) {
#pragma omp parallel num_threads(threads)
      {
        if (act) {
#pragma omp for schedule(static)
          for (int i = 0; i < groups * steps; ++i) t.amx_act(a, i / steps, i % steps, vb);
        }
        if (cfg) {
          t.amx_begin();
          t.amx_end();
        }
      }
    }
    return (omp_get_wtime() - t0) / reps * 1e6;
  };
  double fork, cfg, act, all;
  {
    py::gil_scoped_release nogil;
    region(true, true);  // warm-up: thread pool, tile state
    fork = region(false, false);
    cfg = region(true, false);
    act = region(false, true);
    all = region(true, true);
  }
  std::free(vb);
  py::dict d;
  d["fork_us"] = fork;
  d["cfg_us"] = cfg;
  d["act_us"] = act;
  d["all_us"] = all;
  return d;
}

// The host's OpenMP costs on `threads` threads, mean us over `reps`: fork
// (an empty parallel region: fork + join) and barrier (one `omp barrier`
// inside a running region). On a VM whose vCPUs the hypervisor takes away,
// both grow by orders of magnitude (a device host of session 13: ~650 us per
// fork at 16 threads against ~4 us on the next one), which makes every
// multi-thread timing of that host noise: bench/host_probe.py checks first.
static py::dict omp_costs(int threads, int reps) {
  double fork, barrier;
  {
    py::gil_scoped_release nogil;
    auto forks = [&] {
      const double t0 = omp_get_wtime();
      for (int r = 0; r < reps; ++r) {
#pragma omp parallel num_threads(threads)
        {
          asm volatile("" ::: "memory");  // (an empty region the compiler keeps)
        }
      }
      return (omp_get_wtime() - t0) / reps * 1e6;
    };
    forks();  // warm-up: the thread pool
    fork = forks();
    double t = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp barrier
#pragma omp master
      t = omp_get_wtime();
      for (int r = 0; r < reps; ++r) {
#pragma omp barrier
      }
#pragma omp master
      t = omp_get_wtime() - t;
    }
    barrier = t / reps * 1e6;
  }
  py::dict d;
  d["threads"] = threads;
  d["fork_us"] = fork;
  d["barrier_us"] = barrier;
  return d;
}

void register_bench(py::module_& m) {
  m.def(
      "bench_omp_costs",
      [](int threads, int reps) {
        if (threads < 1 || reps < 1) throw std::invalid_argument("threads and reps >= 1");
        return omp_costs(threads, reps);
      },
      py::arg("threads"), py::arg("reps") = 2000,
      "Bench builds: mean us of an empty OpenMP parallel region (fork + join) and of one barrier, on `threads` "
      "threads");
  m.def(
      "bench_amx_overheads",
      [](int threads, int n, int kp, int reps) {
        require_isa("amx");
        if (threads < 1 || n < 1 || reps < 1 || kp < 128 || kp % 128)
          throw std::invalid_argument("threads, n, reps >= 1 and kp a positive multiple of 128");
        return amx_overheads(threads, n, kp, reps);
      },
      py::arg("threads"), py::arg("n"), py::arg("kp") = 2560, py::arg("reps") = 2000,
      "Bench builds, AMX CPUs: mean us per call of the AMX GEMM's fork, tile config, activation re-layout "
      "(+ barrier) and all of them, without the jobs");
  m.def("bench_peak_int8", peak_binding(require_avx2, bench_peak_int8_avx2), py::arg("threads"),
        py::arg("iters") = 20000000, "int8 MAC/s of a maddubs+add chain on `threads` threads");
  m.def(
      "bench_peak_fma",
      [](int threads, int64_t iters, bool zmm) {
        return zmm ? peak_binding([] { require_isa("avx512vnni"); }, bench_peak_fma_avx512)(threads, iters)
                   : peak_binding(require_avx2, bench_peak_fma_avx2)(threads, iters);
      },
      py::arg("threads"), py::arg("iters") = 10000000, py::arg("zmm") = false,
      "fp32 FMA/s of 10 vfmadd231ps chains (ymm, or zmm on AVX-512 VNNI CPUs) on `threads` threads");
  m.def("bench_peak_vnni", peak_binding([] { require_isa("avx512vnni"); }, bench_peak_vnni), py::arg("threads"),
        py::arg("iters") = 10000000, "int8 MAC/s of 12 vpdpbusd zmm chains on `threads` threads");
  m.def("bench_peak_amx", peak_binding([] { require_isa("amx"); }, bench_peak_amx), py::arg("threads"),
        py::arg("iters") = 200000, "int8 MAC/s of TDPBSSD on 4 accumulator tiles per thread");
  m.def(
      "bench_bandwidth",
      [](U8 buf, int threads, int reps) {
        require_avx2();
        if (threads < 1 || reps < 1) throw std::invalid_argument("threads and reps must be >= 1");
        if (reinterpret_cast<uintptr_t>(buf.data()) % 32) throw std::invalid_argument("buffer must be 32-byte aligned");
        py::gil_scoped_release nogil;
        return bench_read_bw_avx2(buf.data(), (size_t)buf.size(), threads, reps);
      },
      py::arg("buf"), py::arg("threads"), py::arg("reps") = 1, "read bytes/s streaming `buf` on `threads` threads");

  m.def(
      "set_amx_variant",
      [](int v) {
        if (!amx_variant_ok(v))
          throw std::invalid_argument("AMX variant: bit flags of 1 (L1 unpack), 8 (prefetch), 16 (pipelined unpack),"
                                      " 32 / 64 (64- / 128-row K-sliced jobs), 128 (one unpack stream over the job),"
                                      " 256 (stream depth 3; only with 128); got " + std::to_string(v));
        g_amx_bench_variant = v;
        const int rows = (v & kAmxRows128) ? 128 : (v & kAmxRows64) ? 64 : 32;
        // the shipped kernel itself for its own bits, so 49 measures exactly what ships
        set_amx_ternary_kernel(v == kAmxShipped ? nullptr : kAmxVariantTiles, rows);
      },
      py::arg("variant"),
      "Bench builds: run the AMX ternary GEMMs through variant `variant` (bit flags, csrc/bench/amx_variants_amx.cpp;"
      " 49 = the shipped kernel). Not thread-safe against concurrent GEMM calls");
  m.def(
      "bench_rows",
      [](const std::string& op, const std::string& isa, int n, int k, int threads, int reps, bool gemm_layout) {
        const char* ops[] = {"empty", "add_norm_quant", "act_norm_quant"};
        int o = -1;
        for (int i = 0; i < 3; ++i)
          if (op == ops[i]) o = i;
        if (o < 0) throw std::invalid_argument("bench_rows: op is one of empty, add_norm_quant, act_norm_quant");
        const SmallOps& t = small_ops(isa_level(isa));
        py::gil_scoped_release nogil;
        return bench_rows(t, o, n, k, threads, reps, gemm_layout);
      },
      py::arg("op"), py::arg("isa"), py::arg("n"), py::arg("k"), py::arg("threads"), py::arg("reps") = 200,
      py::arg("gemm_layout") = true,
      "Bench builds: seconds per call (one per rep) of a small-op row driver over n rows of k values on `threads` "
      "threads, after a region that wrote the rows as a GEMM leaves them (gemm_layout) or row by row");
  m.def("get_amx_variant", []() { return g_amx_bench_variant; });
  m.def(
      "bench_gemm_multi",
      [](const std::string& kernel, py::list ws, py::list wscales, I8 q, F32 s, I32 sum) {
        const BenchKernel& k = bench_kernel(kernel);
        require_isa(k.amx >= 0 ? "amx" : "avx512vnni");
        MultiGemmArgs g(ws, wscales, q, s, sum);
        {
          py::gil_scoped_release nogil;
          bench_ternary_multi(k, g.tw.data(), (int)g.tw.size(), g.a);
        }
        return g.results();
      },
      py::arg("kernel"), py::arg("ws"), py::arg("wscales"), py::arg("q"), py::arg("s"), py::arg("sum"),
      "Bench builds: gemm_multi through bench kernel `kernel` (vnni = the shipped VNNI tiles; amx = the shipped AMX kernel and call, "
      "amx_keepcfg / amx_serialact / amx_keepcfg_serialact = the same without per-call tile config / without the "
      "re-layout's barrier), dispatch's job loop for all; needs avx512vnni (amx*: amx)");
}

}  // namespace bitdlm
