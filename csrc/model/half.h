// fp32 -> IEEE fp16 in portable code (no F16C), round to nearest even, for the
// K/V writes of the baseline attention table (attention_avx2.cpp uses F16C).
// The one fp16 -> fp32 decoder is kernels/isa.h's half_to_float. `static` so that copies built
// with different ISA flags never merge at link time.
#pragma once
#include <cstdint>
#include <cstring>

namespace bitdlm {

static inline uint16_t f32_to_f16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= (127u + 16u) << 23) {  // overflow -> Inf, NaN stays NaN
    o = u > (255u << 23) ? 0x7e00 : 0x7c00;
  } else if (u < (113u << 23)) {  // subnormal or zero: let the FPU round
    const uint32_t magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    float f, magic;
    std::memcpy(&f, &u, 4);
    std::memcpy(&magic, &magic_u, 4);
    f += magic;
    std::memcpy(&u, &f, 4);
    o = (uint16_t)(u - magic_u);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1;
    u += ((uint32_t)(15 - 127) << 23) + 0xfff + mant_odd;
    o = (uint16_t)(u >> 13);
  }
  return (uint16_t)(o | (sign >> 16));
}

}  // namespace bitdlm
