// Python bindings of the kernel layer (used by tests and bench/kernels.py).
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/gemm.h"

namespace py = pybind11;

namespace bitdlm {

using I8 = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U16 = py::array_t<uint16_t, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

#if defined(__x86_64__)  // the machine benchmarks are x86-64 code (bench_*.cpp)
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
#endif

void register_kernels(py::module_& m) {
#if defined(__x86_64__)
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
#endif

  m.def("active_isa", &active_isa, "Kernel ISA picked by the dispatcher");
  m.def("supported_isas", &supported_isas, "ISAs this CPU can run, best last");
  m.def(
      "set_isa", [](const std::string& name) { set_isa(name); }, py::arg("name"),
      "Force a kernel ISA in-process (tests/benchmarks); ValueError if unknown or unsupported");
  m.def("set_amx_variant", &set_amx_variant, py::arg("variant"),
        "AMX kernel variant bit flags (1 L1 unpack, 2 static schedule, 4 32-token jobs, 8 prefetch,"
        " 16 pipelined unpack, 32 / 64: 64- / 128-row K-sliced jobs, 128 int8 lm_head on VNNI);"
        " ValueError if out of range");
  m.def("get_amx_variant", &get_amx_variant);
  m.def("amx_min_tokens", &amx_min_tokens);
  m.def("set_amx_min_tokens", &set_amx_min_tokens, py::arg("n"),
        "Ternary GEMMs of >= n tokens run on AMX (with the amx ISA); ValueError if n < 1");
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); });
  m.def("get_max_threads", []() { return omp_get_max_threads(); });

  m.def(
      "quantize_act",
      [](F32 x) {
        if (x.ndim() != 2) throw std::invalid_argument("x must be [N, K]");
        const int N = (int)x.shape(0), K = (int)x.shape(1);
        const int Kp = (int)pad_k(K);
        I8 q({N, Kp});
        F32 s(N);
        I32 sum(N);
        {
          py::gil_scoped_release nogil;
          quantize_act(x.data(), N, K, Kp, q.mutable_data(), s.mutable_data(), sum.mutable_data());
        }
        return py::make_tuple(q, s, sum);
      },
      "Per-token absmax int8 quantization -> (codes [N, Kp], scale [N], sum [N])");

  m.def(
      "gemm_i32",
      [](U8 w, I8 q, I32 sum) {
        if (w.ndim() != 2 || q.ndim() != 2) throw std::invalid_argument("w and q must be 2-D");
        const int M = (int)w.shape(0), Kp = (int)q.shape(1), N = (int)q.shape(0);
        if (Kp % kKBlock || w.shape(1) * 4 != Kp) throw std::invalid_argument("w is [M, Kp/4], q is [N, Kp], Kp % 128 == 0");
        if (sum.size() != N) throw std::invalid_argument("sum must have N entries");
        I32 out({N, M});
        std::vector<float> ones(N, 1.f);
        ActQ a{q.data(), ones.data(), sum.data(), N, Kp};
        {
          py::gil_scoped_release nogil;
          gemm_i2_i8_i32(w.data(), M, a, out.mutable_data());
        }
        return out;
      },
      "Exact int32 ternary x int8 products [N, M]");

  m.def(
      "gemm",
      [](U8 w, float wscale, I8 q, F32 s, I32 sum) {
        if (w.ndim() != 2 || q.ndim() != 2) throw std::invalid_argument("w and q must be 2-D");
        const int M = (int)w.shape(0), Kp = (int)q.shape(1), N = (int)q.shape(0);
        if (Kp % kKBlock || w.shape(1) * 4 != Kp) throw std::invalid_argument("w is [M, Kp/4], q is [N, Kp], Kp % 128 == 0");
        if (sum.size() != N || s.size() != N) throw std::invalid_argument("scale and sum must have N entries");
        F32 y({N, M});
        TernaryW tw{w.data(), M, wscale, y.mutable_data(), M};
        ActQ a{q.data(), s.data(), sum.data(), N, Kp};
        {
          py::gil_scoped_release nogil;
          gemm_i2_i8(&tw, 1, a);
        }
        return y;
      },
      "Dequantized ternary GEMM y[N, M] = (W q) / (wscale * s)");

  m.def(
      "gemm_f16",
      [](U16 w, F32 x) {
        if (w.ndim() != 2 || x.ndim() != 2) throw std::invalid_argument("w must be [M, K] and x [N, K]");
        const int M = (int)w.shape(0), K = (int)w.shape(1), N = (int)x.shape(0);
        if (x.shape(1) != K) throw std::invalid_argument("x must be [N, K] with the K of w");
        F32 y({N, M});
        {
          py::gil_scoped_release nogil;
          gemm_f16_f32(w.data(), M, K, x.data(), N, y.mutable_data(), M);
        }
        return y;
      },
      py::arg("w"), py::arg("x"), "fp16 lm_head GEMM: w uint16 (half bits) [M, K] x f32 [N, K] -> [N, M]");

  m.def(
      "gemm_i8",
      [](I8 w, F32 wscale, I8 q, F32 s) {
        if (w.ndim() != 2 || q.ndim() != 2) throw std::invalid_argument("w must be [M, K] and q [N, Kp]");
        const int M = (int)w.shape(0), K = (int)w.shape(1), N = (int)q.shape(0), Kp = (int)q.shape(1);
        if (Kp != pad_k(K)) throw std::invalid_argument("q must be [N, pad_k(K)] (from quantize_act)");
        if (wscale.size() != M || s.size() != N) throw std::invalid_argument("wscale must have M and s N entries");
        const int8_t* qd = q.data();
        for (int64_t i = 0; i < (int64_t)N * Kp; ++i)
          if (qd[i] == -128) throw std::invalid_argument("activation codes must lie in [-127, 127]");
        F32 y({N, M});
        ActQ a{qd, s.data(), nullptr, N, Kp};
        {
          py::gil_scoped_release nogil;
          gemm_i8_i8(w.data(), wscale.data(), M, K, a, y.mutable_data(), M);
        }
        return y;
      },
      py::arg("w"), py::arg("wscale"), py::arg("q"), py::arg("s"),
      "int8 lm_head GEMM: (w int8 [M, K] * wscale[M]) x (q [N, Kp] / s[N]) -> [N, M]");

  m.def(
      "gemm_multi",
      [](py::list ws, py::list wscales, I8 q, F32 s, I32 sum) {
        if (q.ndim() != 2) throw std::invalid_argument("q must be [N, Kp]");
        const int N = (int)q.shape(0), Kp = (int)q.shape(1);
        if (Kp % kKBlock) throw std::invalid_argument("q must be [N, Kp], Kp % 128 == 0");
        if (sum.size() != N || s.size() != N) throw std::invalid_argument("scale and sum must have N entries");
        if (ws.size() != wscales.size()) throw std::invalid_argument("one scale per matrix");
        std::vector<U8> keep;
        std::vector<F32> outs;
        std::vector<TernaryW> tw;
        for (size_t i = 0; i < ws.size(); ++i) {
          U8 w = py::cast<U8>(ws[i]);
          if (w.ndim() != 2 || w.shape(1) * 4 != Kp) throw std::invalid_argument("every w must be [M, Kp/4]");
          F32 y({N, (int)w.shape(0)});
          tw.push_back(TernaryW{w.data(), (int)w.shape(0), py::cast<float>(wscales[i]), y.mutable_data(), (int)w.shape(0)});
          keep.push_back(w);
          outs.push_back(y);
        }
        ActQ a{q.data(), s.data(), sum.data(), N, Kp};
        {
          py::gil_scoped_release nogil;
          gemm_i2_i8(tw.data(), (int)tw.size(), a);
        }
        py::list res;
        for (auto& y : outs) res.append(y);
        return res;
      },
      py::arg("ws"), py::arg("wscales"), py::arg("q"), py::arg("s"), py::arg("sum"),
      "Several ternary GEMMs sharing one quantized input, in one parallel region -> list of [N, M_i]");
}

}  // namespace bitdlm
