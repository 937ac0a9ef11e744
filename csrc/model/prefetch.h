// Software prefetch of the K / V rows that attention streams from DRAM.
// A decode unit reads each cached row once; without prefetch a core waits on
// each row's lines and reads at ~1/3 of its bandwidth (bench/attn_ab.py,
// docs/architecture.md "Attention"). `static`: each ISA file keeps its own copy.
#pragma once
#include <cstdint>

namespace bitdlm {

// How far ahead (rows) the decode kernels prefetch K (scores) and V (values).
constexpr int kAttnPrefetchRows = 32;

// Every 64-byte line of `rows` rows of `d` elements at stride `ld`; locality
// Loc 3 = into L1, 2 = L2 (the rows-in-lanes path, attention_lanes.inc, uses both).
template <int Loc = 3, class T>
static inline void prefetch_rows(const T* p, int64_t ld, int rows, int d) {
  const int bytes = d * (int)sizeof(T);
  for (int r = 0; r < rows; ++r)
    for (int b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(p + r * ld) + b, 0, Loc);
}

}  // namespace bitdlm
