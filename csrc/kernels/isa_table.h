// The one mechanism by which every op family (GEMM kernels, attention, small
// ops, sampling) keeps its implementations per ISA level: an IsaTable lists the
// levels that have their own table of function pointers (null entries allowed)
// and resolves, once, a complete table for every level -- its own entries with
// the null ones taken from the resolved level below, or the level below as a
// whole where it has none (each level's CPUs also run every level below it).
// Calls index it with active_isa_id(), the dispatcher's one choice; ISA names
// exist only in dispatch.cpp (isa_name / isa_level).
//
// T must be a struct of function pointers only: the fill works entry by entry
// on its bytes (function pointers share one size and null representation on
// every target we build for).
#pragma once
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "kernels/gemm.h"

namespace bitdlm {

template <class T>
struct IsaOwn {
  Isa level;
  const T* table;
};

template <class T>
class IsaTable {
  using Fn = void (*)();
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) % sizeof(Fn) == 0,
                "an ISA table is a struct of function pointers");
  static constexpr int kLevels = (int)Isa::kNumIsa, kEntries = (int)(sizeof(T) / sizeof(Fn));
  T t_[kLevels];

 public:
  // The scalar level must be listed and complete (every entry an op needs).
  IsaTable(std::initializer_list<IsaOwn<T>> own) {
    const T* mine[kLevels] = {};
    for (const IsaOwn<T>& o : own) mine[(int)o.level] = o.table;
    Fn below[kEntries] = {};
    for (int i = 0; i < kLevels; ++i) {
      Fn e[kEntries] = {};
      if (mine[i]) std::memcpy(e, mine[i], sizeof(T));
      for (int j = 0; j < kEntries; ++j)
        if (!e[j]) e[j] = below[j];
      std::memcpy(&t_[i], e, sizeof(T));
      std::memcpy(below, e, sizeof(T));
    }
  }
  const T& operator[](Isa isa) const { return t_[(int)isa]; }
  // The table of the level the dispatcher picked.
  const T& active() const { return t_[(int)active_isa_id()]; }
};

}  // namespace bitdlm
