// Machine ceilings for bench/kernels.py (AVX2 build flags; called only after
// dispatch.cpp's cpuid check via the bindings).
#include <immintrin.h>
#include <omp.h>

#include <cstddef>
#include <cstdint>

#include "bench/team_timer.h"

namespace bitdlm {

// int8 multiply-accumulate peak: 8 independent vpmaddubsw -> vpaddw chains
// (the ternary kernel's inner operation) in inline asm, so the compiler can
// neither merge nor spill them. Returns MAC/s (32 per vpmaddubsw) over
// `threads` threads.
double bench_peak_int8_avx2(int threads, int64_t iters) {
  const double s = team_seconds(threads, [&] {
    int64_t n = iters;
    __asm__ volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
        "vmovdqa %%ymm0, %%ymm1\n\tvmovdqa %%ymm0, %%ymm2\n\tvmovdqa %%ymm0, %%ymm3\n\t"
        "vmovdqa %%ymm0, %%ymm4\n\tvmovdqa %%ymm0, %%ymm5\n\tvmovdqa %%ymm0, %%ymm6\n\t"
        "vmovdqa %%ymm0, %%ymm7\n\t"
        "vpcmpeqb %%ymm8, %%ymm8, %%ymm8\n\t"
        "vpabsb %%ymm8, %%ymm9\n\tvpaddb %%ymm9, %%ymm9, %%ymm10\n\tvmovdqa %%ymm9, %%ymm11\n\t"
        "vmovdqa %%ymm8, %%ymm12\n\tvmovdqa %%ymm10, %%ymm13\n\t"
        "1:\n\t"
        "vpmaddubsw %%ymm12, %%ymm8, %%ymm14\n\tvpaddw %%ymm14, %%ymm0, %%ymm0\n\t"
        "vpmaddubsw %%ymm12, %%ymm9, %%ymm15\n\tvpaddw %%ymm15, %%ymm1, %%ymm1\n\t"
        "vpmaddubsw %%ymm12, %%ymm10, %%ymm14\n\tvpaddw %%ymm14, %%ymm2, %%ymm2\n\t"
        "vpmaddubsw %%ymm12, %%ymm11, %%ymm15\n\tvpaddw %%ymm15, %%ymm3, %%ymm3\n\t"
        "vpmaddubsw %%ymm13, %%ymm8, %%ymm14\n\tvpaddw %%ymm14, %%ymm4, %%ymm4\n\t"
        "vpmaddubsw %%ymm13, %%ymm9, %%ymm15\n\tvpaddw %%ymm15, %%ymm5, %%ymm5\n\t"
        "vpmaddubsw %%ymm13, %%ymm10, %%ymm14\n\tvpaddw %%ymm14, %%ymm6, %%ymm6\n\t"
        "vpmaddubsw %%ymm13, %%ymm11, %%ymm15\n\tvpaddw %%ymm15, %%ymm7, %%ymm7\n\t"
        "dec %0\n\t"
        "jnz 1b\n\t"
        "vzeroupper\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "xmm13", "xmm14", "xmm15", "cc");
  });
  return (double)threads * iters * 8 * 32 / s;
}

// fp32 FMA peak (attention's floor): 10 independent vfmadd231ps ymm chains in
// inline asm (latency 4-5 x 2 ports needs >= 10 in flight). Returns FMA/s
// (8 per instruction) over `threads` threads.
double bench_peak_fma_avx2(int threads, int64_t iters) {
  const double s = team_seconds(threads, [&] {
    int64_t n = iters;
    __asm__ volatile(
        "vxorps %%ymm0, %%ymm0, %%ymm0\n\t"
        "vmovaps %%ymm0, %%ymm1\n\t"
        "vmovaps %%ymm0, %%ymm2\n\t"
        "vmovaps %%ymm0, %%ymm3\n\t"
        "vmovaps %%ymm0, %%ymm4\n\t"
        "vmovaps %%ymm0, %%ymm5\n\t"
        "vmovaps %%ymm0, %%ymm6\n\t"
        "vmovaps %%ymm0, %%ymm7\n\t"
        "vmovaps %%ymm0, %%ymm8\n\t"
        "vmovaps %%ymm0, %%ymm9\n\t"
        "vmovaps %%ymm0, %%ymm10\n\tvmovaps %%ymm0, %%ymm11\n\t"
        "1:\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm0\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm1\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm2\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm3\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm4\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm5\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm6\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm7\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm8\n\t"
        "vfmadd231ps %%ymm10, %%ymm11, %%ymm9\n\t"
        "dec %0\n\t"
        "jnz 1b\n\t"
        "vzeroupper\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "cc");
  });
  return (double)threads * iters * 10 * 8 / s;
}

// Read bandwidth: each thread streams its half of buf `reps` times with 256-bit
// loads and a cheap reduction. Returns bytes/s.
double bench_read_bw_avx2(const uint8_t* buf, size_t bytes, int threads, int reps) {
  double t0 = 0, t1 = 0;
  int64_t sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const size_t per = bytes / nt / 128 * 128;
    const uint8_t* p = buf + per * id;
    __m256i x0 = _mm256_setzero_si256(), x1 = x0, x2 = x0, x3 = x0;
#pragma omp barrier
#pragma omp master
    t0 = omp_get_wtime();
    for (int r = 0; r < reps; ++r)
      for (size_t i = 0; i < per; i += 128) {
        x0 = _mm256_xor_si256(x0, _mm256_load_si256((const __m256i*)(p + i)));
        x1 = _mm256_xor_si256(x1, _mm256_load_si256((const __m256i*)(p + i + 32)));
        x2 = _mm256_xor_si256(x2, _mm256_load_si256((const __m256i*)(p + i + 64)));
        x3 = _mm256_xor_si256(x3, _mm256_load_si256((const __m256i*)(p + i + 96)));
      }
    sink += _mm256_extract_epi32(_mm256_xor_si256(_mm256_xor_si256(x0, x1), _mm256_xor_si256(x2, x3)), 0);
#pragma omp barrier
#pragma omp master
    t1 = omp_get_wtime();
  }
  if (sink == 42) t1 += 1e-12;
  return (double)(bytes / threads / 128 * 128) * threads * reps / (t1 - t0);
}

}  // namespace bitdlm
