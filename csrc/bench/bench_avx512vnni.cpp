// VNNI int8 peak (and the zmm fp32 FMA peak) for bench/kernels.py (AVX-512 VNNI flags; called only when the
// dispatcher lists avx512vnni). 12 independent vpdpbusd zmm chains in inline
// asm (the compiler can neither merge nor drop them; latency ~5-6 cycles at 2
// per cycle on Sapphire Rapids needs >= 12 in flight: 8 read ~40% low); 64 MAC
// per instruction.
#include <omp.h>

#include <cstdint>

#include "bench/team_timer.h"

namespace bitdlm {

double bench_peak_vnni(int threads, int64_t iters) {
  const double s = team_seconds(threads, [&] {
    int64_t n = iters;
    __asm__ volatile(
        "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
        "vmovdqa64 %%zmm0, %%zmm1\n\tvmovdqa64 %%zmm0, %%zmm2\n\tvmovdqa64 %%zmm0, %%zmm3\n\t"
        "vmovdqa64 %%zmm0, %%zmm4\n\tvmovdqa64 %%zmm0, %%zmm5\n\tvmovdqa64 %%zmm0, %%zmm6\n\t"
        "vmovdqa64 %%zmm0, %%zmm7\n\tvmovdqa64 %%zmm0, %%zmm8\n\tvmovdqa64 %%zmm0, %%zmm9\n\t"
        "vmovdqa64 %%zmm0, %%zmm10\n\tvmovdqa64 %%zmm0, %%zmm11\n\t"
        "vpternlogd $0xff, %%zmm12, %%zmm12, %%zmm12\n\t"
        "vpabsb %%zmm12, %%zmm13\n\t"
        "1:\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm0\n\tvpdpbusd %%zmm12, %%zmm13, %%zmm1\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm2\n\tvpdpbusd %%zmm12, %%zmm13, %%zmm3\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm4\n\tvpdpbusd %%zmm12, %%zmm13, %%zmm5\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm6\n\tvpdpbusd %%zmm12, %%zmm13, %%zmm7\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm8\n\tvpdpbusd %%zmm12, %%zmm13, %%zmm9\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm10\n\tvpdpbusd %%zmm12, %%zmm13, %%zmm11\n\t"
        "dec %0\n\t"
        "jnz 1b\n\t"
        "vzeroupper\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "xmm13", "cc");
  });
  return (double)threads * iters * 12 * 64 / s;
}

// fp32 FMA peak of 512-bit FMAs (the AVX-512 attention's floor): 10 vfmadd231ps
// zmm chains; FMA/s (16 per instruction).
double bench_peak_fma_avx512(int threads, int64_t iters) {
  const double s = team_seconds(threads, [&] {
    int64_t n = iters;
    __asm__ volatile(
        "vxorps %%zmm0, %%zmm0, %%zmm0\n\t"
        "vmovaps %%zmm0, %%zmm1\n\t"
        "vmovaps %%zmm0, %%zmm2\n\t"
        "vmovaps %%zmm0, %%zmm3\n\t"
        "vmovaps %%zmm0, %%zmm4\n\t"
        "vmovaps %%zmm0, %%zmm5\n\t"
        "vmovaps %%zmm0, %%zmm6\n\t"
        "vmovaps %%zmm0, %%zmm7\n\t"
        "vmovaps %%zmm0, %%zmm8\n\t"
        "vmovaps %%zmm0, %%zmm9\n\t"
        "vmovaps %%zmm0, %%zmm10\n\tvmovaps %%zmm0, %%zmm11\n\t"
        "1:\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm0\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm1\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm2\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm3\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm4\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm5\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm6\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm7\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm8\n\t"
        "vfmadd231ps %%zmm10, %%zmm11, %%zmm9\n\t"
        "dec %0\n\t"
        "jnz 1b\n\t"
        "vzeroupper\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "cc");
  });
  return (double)threads * iters * 10 * 16 / s;
}

}  // namespace bitdlm
