// Python bindings of the kernel layer (used by tests and bench/kernels.py).
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bind_arrays.h"
#include "kernels/bind_multi.h"
#include "kernels/gemm.h"
#include "kernels/team_clock.h"

namespace py = pybind11;

namespace bitdlm {

void register_kernels(py::module_& m) {
  m.def("active_isa", &active_isa, "Kernel ISA picked by the dispatcher");
  m.def("supported_isas", &supported_isas, "ISAs this CPU can run, best last");
  m.def(
      "set_isa", [](const std::string& name) { set_isa(name); }, py::arg("name"),
      "Force a kernel ISA in-process (tests/benchmarks); ValueError if unknown or unsupported");
  m.def("amx_min_tokens", &amx_min_tokens);
  m.def("set_amx_min_tokens", &set_amx_min_tokens, py::arg("n"),
        "Ternary GEMMs of >= n tokens run on AMX (with the amx ISA); ValueError if n < 1");
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); });
  m.def("get_max_threads", []() { return omp_get_max_threads(); });
  m.def("set_team_profile", &set_team_profile, py::arg("on"),
        "time every parallel region's fork, per-thread work, imbalance and join (team_profile); "
        "Model.set_profile turns it on and off with the phase profile");
  m.def(
      "team_profile",
      [](bool reset) {
        py::dict d;
        const auto st = team_profile(reset);
        for (int k = 0; k < kNumTeamKinds; ++k) {
          const TeamStats& s = st[k];
          py::dict e;
          e["calls"] = s.calls;
          e["wall"] = s.wall;
          e["fork"] = s.fork;
          e["work"] = s.work;
          e["imbalance"] = s.imbalance;
          e["join"] = s.join;
          e["mean_threads"] = s.calls ? s.threads / (double)s.calls : 0.0;
          d[kTeamKindNames[k]] = e;
        }
        return d;
      },
      py::arg("reset") = false,
      "per region kind (ternary_gemm, lm_head, attention): calls and seconds summed over them: wall "
      "(the region) = fork (to a thread's start, mean) + work (a thread's jobs, mean) + imbalance (last "
      "thread done - mean) + join (region end - last thread done); mean_threads: the team size");

  // [N, Kp] int8 codes at a kActAlign boundary (gemm.h): a view into a slightly
  // larger array, which it keeps alive.
  auto aligned_codes = [](int N, int Kp) {
    py::array_t<int8_t> raw((py::ssize_t)N * Kp + kActAlign);
    const size_t off = (kActAlign - (uintptr_t)raw.data() % kActAlign) % kActAlign;
    return I8({(py::ssize_t)N, (py::ssize_t)Kp}, {(py::ssize_t)Kp, (py::ssize_t)1}, raw.mutable_data() + off, raw);
  };
  m.def(
      "quantize_act",
      [aligned_codes](F32 x) {
        if (x.ndim() != 2) throw std::invalid_argument("x must be [N, K]");
        const int N = (int)x.shape(0), K = (int)x.shape(1);
        const int Kp = (int)pad_k(K);
        I8 q = aligned_codes(N, Kp);
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
        MultiGemmArgs g(ws, wscales, q, s, sum);
        {
          py::gil_scoped_release nogil;
          gemm_i2_i8(g.tw.data(), (int)g.tw.size(), g.a);
        }
        return g.results();
      },
      py::arg("ws"), py::arg("wscales"), py::arg("q"), py::arg("s"), py::arg("sum"),
      "Several ternary GEMMs sharing one quantized input, in one parallel region -> list of [N, M_i]");
}

}  // namespace bitdlm
