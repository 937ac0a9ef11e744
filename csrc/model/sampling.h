// The select epilogue: top-1 / sampled token and its confidence per logits row,
// so that no vocab-sized array goes back to Python.
#pragma once
#include <cstdint>

namespace bitdlm {

// For each row r of logits [rows, V] (row stride ld; banned ids already -inf;
// rows are modified in place):
//  temperature[r] <= 0: tok = argmax (first on ties), conf = its softmax probability;
//  otherwise p = softmax(logits / T), restricted to the top-p nucleus (the
//  most probable tokens, kept while the mass before them is <= top_p, at least
//  one), renormalized; tok = the first id in increasing id order whose
//  cumulative kept mass exceeds uniform[r] * kept mass; conf = its kept probability.
// The greedy row (argmax, first on ties, and its softmax probability) per ISA
// level; false for rows it cannot handle (NaN): the portable row then serves.
struct SelectKernels {
  bool (*greedy)(const float* l, int V, int32_t* tok, float* conf);
};
#if defined(__x86_64__)
extern const SelectKernels kSelectAvx2;  // sampling_avx2.cpp
#elif defined(__aarch64__)
extern const SelectKernels kSelectNeon;  // sampling_neon.cpp (every ARM level)
#endif

void select_rows(float* logits, int rows, int V, int64_t ld, const float* temperature, const float* top_p,
                 const float* uniform, int32_t* tok, float* conf);

}  // namespace bitdlm
