// Python bindings of the bench-only kernels (BITDLM_BENCH_KERNELS builds:
// bench/kernels.py's machine ceilings, bench/amx_sweep.py's AMX variants).
// The shipped module has none of these.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "kernels/gemm.h"
#include "kernels/isa.h"

namespace py = pybind11;

namespace bitdlm {

using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

// bench_avx2.cpp (AVX2 flags): only called when the CPU has AVX2.
double bench_peak_int8_avx2(int threads, int64_t iters);
double bench_read_bw_avx2(const uint8_t* buf, size_t bytes, int threads, int reps);

// bench_avx512vnni.cpp / bench_amx.cpp: only called when that ISA is supported.
double bench_peak_vnni(int threads, int64_t iters);
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

// amx_variants_amx.cpp: the variant kernels and their bit flags.
extern int g_amx_bench_variant;
extern const AmxTernaryFn kAmxVariantTiles;
constexpr int kAmxShipped = 1 | 32;        // = gemm_amx.cpp's kernel, kAmxRowBlock rows
constexpr int kAmxVariantBits = 1 | 8 | 16 | 32 | 64;

void register_bench(py::module_& m) {
  m.def(
      "bench_peak_int8",
      [](int threads, int64_t iters) {
        require_avx2();
        if (threads < 1 || iters < 1) throw std::invalid_argument("threads and iters must be >= 1");
        py::gil_scoped_release nogil;
        return bench_peak_int8_avx2(threads, iters);
      },
      py::arg("threads"), py::arg("iters") = 20000000, "int8 MAC/s of a maddubs+add chain on `threads` threads");
  m.def(
      "bench_peak_vnni",
      [](int threads, int64_t iters) {
        require_isa("avx512vnni");
        if (threads < 1 || iters < 1) throw std::invalid_argument("threads and iters must be >= 1");
        py::gil_scoped_release nogil;
        return bench_peak_vnni(threads, iters);
      },
      py::arg("threads"), py::arg("iters") = 10000000, "int8 MAC/s of 8 vpdpbusd zmm chains on `threads` threads");
  m.def(
      "bench_peak_amx",
      [](int threads, int64_t iters) {
        require_isa("amx");
        if (threads < 1 || iters < 1) throw std::invalid_argument("threads and iters must be >= 1");
        py::gil_scoped_release nogil;
        return bench_peak_amx(threads, iters);
      },
      py::arg("threads"), py::arg("iters") = 200000, "int8 MAC/s of TDPBSSD on 4 accumulator tiles per thread");
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
        if (v < 0 || (v & ~kAmxVariantBits))
          throw std::invalid_argument("AMX variant: bit flags of 1 (L1 unpack), 8 (prefetch), 16 (pipelined unpack),"
                                      " 32 / 64 (64- / 128-row K-sliced jobs); got " + std::to_string(v));
        g_amx_bench_variant = v;
        const int rows = (v & 64) ? 128 : (v & 32) ? 64 : 32;
        // the shipped kernel itself for its own bits, so 33 measures exactly what ships
        set_amx_ternary_kernel(v == kAmxShipped ? nullptr : kAmxVariantTiles, rows);
      },
      py::arg("variant"),
      "Bench builds: run the AMX ternary GEMMs through variant `variant` (bit flags, csrc/bench/amx_variants_amx.cpp;"
      " 33 = the shipped kernel). Not thread-safe against concurrent GEMM calls");
  m.def("get_amx_variant", []() { return g_amx_bench_variant; });
}

}  // namespace bitdlm
