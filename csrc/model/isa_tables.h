// Per-ISA table arrays for the model's op families (attention, sampling, small
// ops): one entry per Isa level, indexed by active_isa_id(). A level without its
// own table gets the best lower one, filled in once when the array is built.
#pragma once
#include <initializer_list>

#include "kernels/gemm.h"

namespace bitdlm {

template <class T>
struct IsaTables {
  const T* t[(int)Isa::kNumIsa];
  // own[i]: the table of level i, or nullptr (then level i uses level i-1's).
  explicit IsaTables(std::initializer_list<const T*> own) {
    const T* last = nullptr;
    int i = 0;
    for (const T* p : own) {
      if (i == (int)Isa::kNumIsa) break;
      last = p ? p : last;
      t[i++] = last;
    }
    for (; i < (int)Isa::kNumIsa; ++i) t[i] = last;
  }
  const T& operator[](Isa isa) const { return *t[(int)isa]; }
};

}  // namespace bitdlm
