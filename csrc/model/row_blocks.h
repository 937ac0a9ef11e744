// Rows [0, R) in register-tile blocks of 4, then one tail block of 3, 2 or 1:
// the tile kernels take their row count as a template constant, so the
// attention kernels of every ISA walk their rows through this one helper.
// `static`: each ISA file (own -m flags) keeps its own copy.
#pragma once
#include <type_traits>

namespace bitdlm {

template <class F>
static inline void for_row_blocks4(int R, F&& f) {
  int r = 0;
  for (; r + 4 <= R; r += 4) f(std::integral_constant<int, 4>{}, r);
  switch (R - r) {
    case 3: f(std::integral_constant<int, 3>{}, r); break;
    case 2: f(std::integral_constant<int, 2>{}, r); break;
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

}  // namespace bitdlm
