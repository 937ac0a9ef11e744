// The arguments of a multi-GEMM binding (several ternary matrices sharing one
// quantized input): checked once, with the output arrays and the kernel
// structs. Used by _core.gemm_multi (bind_kernels.cpp) and, in bench builds,
// _core.bench_gemm_multi (csrc/bench/bind_bench.cpp). Baseline code only.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <vector>

#include "bind_arrays.h"
#include "kernels/gemm.h"

namespace bitdlm {

struct MultiGemmArgs {
  I8 q;
  F32 s;
  I32 sum;
  std::vector<U8> keep;   // the converted weight arrays stay alive with tw
  std::vector<F32> outs;  // [N, M_i] each
  std::vector<TernaryW> tw;
  ActQ a{};

  MultiGemmArgs(pybind11::list ws, pybind11::list wscales, I8 q_, F32 s_, I32 sum_) : q(q_), s(s_), sum(sum_) {
    if (q.ndim() != 2) throw std::invalid_argument("q must be [N, Kp]");
    const int N = (int)q.shape(0), Kp = (int)q.shape(1);
    if (Kp % kKBlock) throw std::invalid_argument("q must be [N, Kp], Kp % 128 == 0");
    if (sum.size() != N || s.size() != N) throw std::invalid_argument("scale and sum must have N entries");
    if (ws.size() != wscales.size()) throw std::invalid_argument("one scale per matrix");
    for (size_t i = 0; i < ws.size(); ++i) {
      U8 w = pybind11::cast<U8>(ws[i]);
      if (w.ndim() != 2 || w.shape(1) * 4 != Kp) throw std::invalid_argument("every w must be [M, Kp/4]");
      F32 y({N, (int)w.shape(0)});
      tw.push_back(
          TernaryW{w.data(), (int)w.shape(0), pybind11::cast<float>(wscales[i]), y.mutable_data(), (int)w.shape(0)});
      keep.push_back(w);
      outs.push_back(y);
    }
    a = ActQ{q.data(), s.data(), sum.data(), N, Kp};
  }

  pybind11::list results() const {
    pybind11::list res;
    for (auto& y : outs) res.append(y);
    return res;
  }
};

}  // namespace bitdlm
