// IEEE fp16 <-> fp32 in portable code (no F16C), round to nearest even.
// Used off the hot path (embedding rows, K/V writes, the baseline attention);
// attention_avx2.cpp converts with F16C instead. `static` so that copies built
// with different ISA flags never merge at link time.
#pragma once
#include <cstdint>
#include <cstring>

namespace bitdlm {

static inline float f16_to_f32(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t)(h & 0x7fff) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  float f;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // Inf / NaN
    std::memcpy(&f, &o, 4);
  } else if (exp == 0) {  // zero / subnormal: renormalize with a float subtraction
    o += 1u << 23;
    std::memcpy(&f, &o, 4);
    const uint32_t magic_u = 113u << 23;
    float magic;
    std::memcpy(&magic, &magic_u, 4);
    f -= magic;
  } else {
    std::memcpy(&f, &o, 4);
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= (uint32_t)(h & 0x8000) << 16;
  std::memcpy(&f, &u, 4);
  return f;
}

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
