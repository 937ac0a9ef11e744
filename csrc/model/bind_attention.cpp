// Binding of attention() alone, for its tests (any ISA table, any thread count)
// and its benchmark (bench/kernels.py: L layers' caches in one call, as a
// forward reads them).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bind_arrays.h"
#include "kernels/gemm.h"
#include "model/attention.h"

namespace py = pybind11;

namespace bitdlm {

namespace {

void need(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

// out = the last layer's attention of one sequence: n fresh queries at
// positions [start, start + n) over cached positions [0, ctx_len) of each
// layer's cache (kc/vc: [L, n_kv, cap, hd], float32 or float16 bits in
// uint16) and over the fresh keys/values k, v, block-causal with blocks of B.
F32 attention_layers(F32 q, F32 k, F32 v, py::array kc, py::array vc, int start, int ctx_len, int B,
                     const std::string& isa) {
  const AttnKernels& kt = isa.empty() ? attn_kernels() : attn_kernels(isa_level(isa));
  need(kc.ndim() == 4 && vc.ndim() == 4, "kc and vc must be [layers, n_kv, cap, head_dim]");
  for (int i = 0; i < 4; ++i) need(kc.shape(i) == vc.shape(i) && kc.shape(i) > 0, "kc and vc must have one shape");
  const bool f16 = kc.dtype().is(py::dtype::of<uint16_t>());
  need(f16 || kc.dtype().is(py::dtype::of<float>()), "kc must be float32 or uint16 (float16 bits)");
  need(kc.dtype().is(vc.dtype()), "kc and vc must have one dtype");
  need((kc.flags() & vc.flags() & py::array::c_style) != 0, "kc and vc must be C-contiguous");
  const int L = (int)kc.shape(0), nkv = (int)kc.shape(1), hd = (int)kc.shape(3);
  const int64_t cap = kc.shape(2);
  need(q.ndim() == 2 && k.ndim() == 2 && v.ndim() == 2, "q, k, v must be [n, heads * head_dim]");
  const int n = (int)q.shape(0);
  need(n > 0 && k.shape(0) == n && v.shape(0) == n, "q, k, v must have the same n > 0 rows");
  need(q.shape(1) % hd == 0 && q.shape(1) / hd % nkv == 0, "q's heads must be a multiple of n_kv");
  need(k.shape(1) == (int64_t)nkv * hd && v.shape(1) == k.shape(1), "k, v must be [n, n_kv * head_dim]");
  need(B > 0 && start >= 0 && ctx_len >= 0 && ctx_len <= cap && (int64_t)start + n <= cap,
       "need B > 0, 0 <= ctx_len <= cap, 0 <= start, start + n <= cap");
  const int nh = (int)(q.shape(1) / hd);
  F32 out(std::vector<py::ssize_t>{n, (py::ssize_t)nh * hd});
  const size_t esz = f16 ? 2 : 4, layer = (size_t)nkv * cap * hd * esz;
  const char* kp = static_cast<const char*>(kc.data());
  const char* vp = static_cast<const char*>(vc.data());
  const float *qp = q.data(), *kf = k.data(), *vf = v.data();
  float* op = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    static thread_local std::vector<float> scratch;  // kept, as the model keeps its own: no page faults per call
    for (int l = 0; l < L; ++l) {
      const AttnItem it{kp + l * layer, vp + l * layer, cap, start, n, ctx_len, 0};
      attention(kt, f16, &it, 1, B, qp, kf, vf, nh, nkv, hd, op, scratch);
    }
  }
  return out;
}
}  // namespace

void register_attention(py::module_& m) {
  m.def("attention", &attention_layers, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kc"), py::arg("vc"),
        py::arg("start"), py::arg("ctx_len"), py::arg("B"), py::arg("isa") = "",
        "Block-causal attention of n fresh queries (q [n, heads*hd], fresh k/v [n, n_kv*hd]) over a KV cache "
        "kc/vc [layers, n_kv, cap, hd] (float32, or uint16 = float16 bits), once per layer; returns the last "
        "layer's output [n, heads*hd]. isa: a table by name (default: the active one).");
}

}  // namespace bitdlm
