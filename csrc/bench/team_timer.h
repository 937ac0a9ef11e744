// The one timing harness of the machine-ceiling kernels (bench_*.cpp): every
// thread runs `prologue` (untimed per-thread setup, e.g. AMX tile config),
// the team starts together at a barrier, runs `body`, and the seconds from
// that barrier to the one after the slowest thread are returned.
#pragma once
#include <omp.h>

namespace bitdlm {

template <class Prologue, class Body>
double team_seconds(int threads, Prologue prologue, Body body) {
  double t0 = 0, t1 = 0;
#pragma omp parallel num_threads(threads)
  {
    prologue();
#pragma omp barrier
#pragma omp master
    t0 = omp_get_wtime();
    body();
#pragma omp barrier
#pragma omp master
    t1 = omp_get_wtime();
  }
  return t1 - t0;
}

template <class Body>
double team_seconds(int threads, Body body) {
  return team_seconds(threads, [] {}, body);
}

}  // namespace bitdlm
