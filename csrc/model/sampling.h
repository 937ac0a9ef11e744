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
// The greedy row's pieces per ISA level, over a chunk of n logits: its max, the
// first index holding a value (-1: none, e.g. NaN logits: the portable row then
// serves), and the sum of exp(l[i] - mx) in double from the level's float exps.
// select_rows runs them over fixed chunks of the vocab (kSelectChunk) and adds
// the chunks' sums in chunk order, so one row split over threads gives the
// same bits as the same row on one thread.
struct SelectKernels {
  float (*row_max)(const float* l, int n);
  int (*first_eq)(const float* l, int n, float v);
  double (*exp_sum)(const float* l, int n, float mx);
};
constexpr int kSelectChunk = 8192;
#if defined(__x86_64__)
extern const SelectKernels kSelectAvx2;  // sampling_avx2.cpp
#elif defined(__aarch64__)
extern const SelectKernels kSelectNeon;  // sampling_neon.cpp (every ARM level)
#endif

void select_rows(float* logits, int rows, int V, int64_t ld, const float* temperature, const float* top_p,
                 const float* uniform, int32_t* tok, float* conf);

}  // namespace bitdlm
