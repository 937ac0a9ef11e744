// The one PYBIND11_MODULE. Each layer registers its own functions so that
// kernels/ and model/ never edit the same file.
#include <dlfcn.h>
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace py = pybind11;

namespace bitdlm {
void register_kernels(py::module_& m);  // csrc/kernels/bind_kernels.cpp
void register_model(py::module_& m);    // csrc/model/bind_model.cpp
void register_group(py::module_& m);    // csrc/model/bind_group.cpp
#ifdef BITDLM_BENCH_KERNELS
void register_bench(py::module_& m);  // csrc/bench/bind_bench.cpp (bench builds only)
#endif

#define BITDLM_STR2(x) #x
#define BITDLM_STR(x) BITDLM_STR2(x)

// What this translation unit was compiled with, read from the predefined
// macros: they are what the compiler really saw (a CMAKE_CXX_FLAGS or CFLAGS
// from the environment included), not what a build script meant to pass. The
// per-ISA kernel files add their own -m flags on top (CMakeLists.txt); this
// file, like the dispatcher, is built at the baseline.
static std::vector<std::string> build_flags() {
  std::vector<std::string> f;
#if defined(__OPTIMIZE_SIZE__)
  f.push_back("-Os");
#elif defined(__OPTIMIZE__)
  f.push_back("-O1 or higher (__OPTIMIZE__)");
#else
  f.push_back("-O0 (unoptimized)");
#endif
#ifdef NDEBUG
  f.push_back("NDEBUG");
#else
  f.push_back("no NDEBUG");
#endif
#ifdef __FAST_MATH__
  f.push_back("-ffast-math");
#endif
#ifdef __NO_MATH_ERRNO__
  f.push_back("-fno-math-errno");
#endif
#ifdef _GLIBCXX_ASSERTIONS
  f.push_back("_GLIBCXX_ASSERTIONS");
#endif
  // Baseline ISA: -march=native or similar would show up here and make the
  // wheel crash on older CPUs.
#if defined(__AVX512F__)
  f.push_back("baseline AVX-512F (not portable)");
#elif defined(__AVX2__)
  f.push_back("baseline AVX2 (not portable)");
#elif defined(__AVX__)
  f.push_back("baseline AVX (not portable)");
#elif defined(__x86_64__)
  f.push_back("baseline x86-64");
#elif defined(__ARM_FEATURE_MATMUL_INT8) || defined(__ARM_FEATURE_DOTPROD)
  f.push_back("baseline with dotprod / i8mm (not portable)");
#elif defined(__aarch64__)
  f.push_back("baseline ARMv8-A");
#else
  f.push_back("baseline: portable code only");
#endif
#ifdef BITDLM_CXX_FLAGS  // optional: the build may pass its flag string verbatim
  f.push_back(BITDLM_CXX_FLAGS);
#endif
  return f;
}

// The OpenMP spec version from _OPENMP (yyyymm) and the runtime library that
// was actually loaded (libgomp, libomp, a wheel's vendored copy, ...).
static py::dict openmp_info() {
  py::dict d;
  const int date = _OPENMP;
  const char* spec = date >= 202111 ? "5.2" : date >= 202011 ? "5.1" : date >= 201811 ? "5.0"
                     : date >= 201511 ? "4.5" : date >= 201307 ? "4.0" : date >= 201107 ? "3.1" : "<3.1";
  d["_OPENMP"] = date;
  d["spec"] = spec;
  Dl_info info{};
  d["library"] = (dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &info) && info.dli_fname)
                     ? std::string(info.dli_fname) : std::string("?");
  return d;
}

static py::dict build_info() {
  py::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string(__VERSION__);
#endif
  d["cplusplus"] = (long)__cplusplus;
  d["flags"] = build_flags();
  d["openmp"] = openmp_info();
#ifdef BITDLM_BENCH_KERNELS
  d["bench_kernels"] = true;  // csrc/bench/ compiled in (bench/ builds only)
#else
  d["bench_kernels"] = false;
#endif
  d["pybind11"] = std::string(BITDLM_STR(PYBIND11_VERSION_MAJOR) "." BITDLM_STR(PYBIND11_VERSION_MINOR) "."
                                  BITDLM_STR(PYBIND11_VERSION_PATCH));
  return d;
}
}  // namespace bitdlm

PYBIND11_MODULE(_core, m) {
  m.doc() = "bitdlm native core: ternary kernels and the BitNet forward";
  bitdlm::register_kernels(m);
  bitdlm::register_model(m);
  bitdlm::register_group(m);
#ifdef BITDLM_BENCH_KERNELS
  bitdlm::register_bench(m);
#endif
  m.def("build_info", &bitdlm::build_info,
        "How this core was built: compiler, flags the compiler saw, C++ standard, OpenMP spec and runtime library");
}
