// The one PYBIND11_MODULE. Each layer registers its own functions so that
// kernels/ and model/ never edit the same file.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace bitdlm {
void register_kernels(py::module_& m);  // csrc/kernels/bind_kernels.cpp
void register_model(py::module_& m);    // csrc/model/bind_model.cpp
}  // namespace bitdlm

PYBIND11_MODULE(_core, m) {
  m.doc() = "bitdlm native core: ternary kernels and the BitNet forward";
  bitdlm::register_kernels(m);
  bitdlm::register_model(m);
}
