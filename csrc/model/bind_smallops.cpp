// Test bindings of the per-ISA small ops (smallops.h): each call names the ISA
// table to run, so tests compare every table the CPU supports bit for bit.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "bind_arrays.h"
#include "kernels/gemm.h"
#include "model/smallops.h"

namespace py = pybind11;

namespace bitdlm {

namespace {

const SmallOps& table_for(const std::string& isa) { return small_ops(isa_level(isa)); }

void need2(const py::buffer_info& b, const char* what) {
  if (b.ndim != 2 || b.shape[0] < 1 || b.shape[1] < 1) throw std::invalid_argument(std::string(what) + " must be [N, K]");
}

// (x after the add, codes [N, pad_k(K)], scales, sums)
py::tuple norm_quant(const std::string& isa, F32 x, py::object d, F32 w, float eps, bool act) {
  const SmallOps& t = table_for(isa);
  auto xb = x.request();
  need2(xb, "x");
  const int N = (int)xb.shape[0], K = (int)xb.shape[1], Kp = (int)pad_k(K);
  if (w.size() != K) throw std::invalid_argument("w must have K values");
  F32 xo(std::vector<py::ssize_t>{N, K});
  std::copy(x.data(), x.data() + x.size(), xo.mutable_data());
  F32 dd;
  if (!d.is_none()) {
    dd = d.cast<F32>();
    if (dd.size() != x.size()) throw std::invalid_argument("d must have the shape of x");
  } else if (act) {
    throw std::invalid_argument("act_norm_quant needs u");
  }
  py::array_t<int8_t> q(std::vector<py::ssize_t>{N, Kp});
  py::array_t<float> s(N);
  py::array_t<int32_t> sum(N);
  if (act)
    act_norm_quant_rows(t, xo.mutable_data(), dd.data(), w.data(), N, K, eps, q.mutable_data(), s.mutable_data(),
                        sum.mutable_data(), Kp);
  else
    add_norm_quant_rows(t, xo.mutable_data(), d.is_none() ? nullptr : dd.data(), w.data(), N, K, eps,
                        q.mutable_data(), s.mutable_data(), sum.mutable_data(), Kp);
  return py::make_tuple(xo, q, s, sum);
}
}  // namespace

void register_smallops(py::module_& m) {
  m.def(
      "smallop_add_norm_quant",
      [](const std::string& isa, F32 x, py::object d, F32 w, float eps) { return norm_quant(isa, x, d, w, eps, false); },
      py::arg("isa"), py::arg("x"), py::arg("d"), py::arg("w"), py::arg("eps"),
      "x += d (d may be None); (x, q, scale, sum) of quantize_act(rmsnorm(x) * w) with that ISA's table");
  m.def(
      "smallop_act_norm_quant",
      [](const std::string& isa, F32 g, F32 u, F32 w, float eps) { return norm_quant(isa, g, u, w, eps, true); },
      py::arg("isa"), py::arg("g"), py::arg("u"), py::arg("w"), py::arg("eps"),
      "g = relu(g)^2 * u; (g, q, scale, sum) of quantize_act(rmsnorm(g) * w) with that ISA's table");
  m.def(
      "smallop_rmsnorm",
      [](const std::string& isa, F32 x, F32 w, float eps) {
        const SmallOps& t = table_for(isa);
        auto xb = x.request();
        need2(xb, "x");
        const int N = (int)xb.shape[0], K = (int)xb.shape[1];
        if (w.size() != K) throw std::invalid_argument("w must have K values");
        F32 y(std::vector<py::ssize_t>{N, K});
        rmsnorm_rows(t, x.data(), w.data(), y.mutable_data(), N, K, eps);
        return y;
      },
      py::arg("isa"), py::arg("x"), py::arg("w"), py::arg("eps"));
  m.def(
      "smallop_rope",
      [](const std::string& isa, F32 v, F32 cos, F32 sin, int hd) {
        const SmallOps& t = table_for(isa);
        auto vb = v.request();
        need2(vb, "v");
        const int N = (int)vb.shape[0], D = (int)vb.shape[1];
        if (hd < 2 || hd % 2 || D % hd) throw std::invalid_argument("hd must be even and divide the row");
        if (cos.size() != (int64_t)N * (hd / 2) || sin.size() != cos.size())
          throw std::invalid_argument("cos and sin must be [N, hd/2]");
        F32 o(std::vector<py::ssize_t>{N, D});
        std::copy(v.data(), v.data() + v.size(), o.mutable_data());
        for (int r = 0; r < N; ++r)
          t.rope(o.mutable_data() + (int64_t)r * D, cos.data() + (int64_t)r * (hd / 2), sin.data() + (int64_t)r * (hd / 2),
                 D / hd, hd);
        return o;
      },
      py::arg("isa"), py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("hd"));
  m.def(
      "smallop_f16_row",
      [](const std::string& isa, U16 e) {
        const SmallOps& t = table_for(isa);
        F32 x(e.size());
        t.f16_row(e.data(), x.mutable_data(), (int)e.size());
        return x;
      },
      py::arg("isa"), py::arg("e"));
  m.def(
      "smallop_i8_row",
      [](const std::string& isa, I8 q, float scale) {
        const SmallOps& t = table_for(isa);
        F32 x(q.size());
        t.i8_row(q.data(), scale, x.mutable_data(), (int)q.size());
        return x;
      },
      py::arg("isa"), py::arg("q"), py::arg("scale"));
}

}  // namespace bitdlm
