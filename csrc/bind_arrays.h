// The numpy array types the bindings take: C-contiguous, converted on the way
// in (forcecast), one alias per element type, for every bind_*.cpp.
#pragma once
#include <pybind11/numpy.h>

#include <cstdint>

namespace bitdlm {

template <class T>
using PyArr = pybind11::array_t<T, pybind11::array::c_style | pybind11::array::forcecast>;
using I8 = PyArr<int8_t>;
using U8 = PyArr<uint8_t>;
using U16 = PyArr<uint16_t>;
using I32 = PyArr<int32_t>;
using F32 = PyArr<float>;

}  // namespace bitdlm
