// Placeholder until the model layer lands (issue 4).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace bitdlm {
void register_model(py::module_& m) {}
}  // namespace bitdlm
