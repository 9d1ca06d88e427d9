// Bit-exact fp16 / bf16 <-> fp32 conversions for host code.
//
// Header-only and free of CUDA so the CPU handler (and anything else on the
// host) can use it. Narrowing conversions round to nearest, ties to even, as
// the hardware and numpy do, so the CPU path reproduces the pure-JAX reference
// bit for bit. Values are carried as raw uint16_t bit patterns: the FFI hands
// us untyped buffers and no portable C++17 half type exists.
#ifndef JAX_MARLIN_COMMON_FLOAT16_H_
#define JAX_MARLIN_COMMON_FLOAT16_H_

#include <cstdint>
#include <cstring>

namespace jax_marlin {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> binary32 (exact: every half is a float).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp_mant = h & 0x7fffu;
  if (exp_mant >= 0x7c00u) {  // Inf or NaN: keep the payload, max exponent.
    return BitsToFloat(sign | 0x7f800000u | (exp_mant & 0x3ffu) << 13);
  }
  // Move exponent+mantissa into float position and rebias (15 -> 127).
  uint32_t bits = (exp_mant << 13) + (static_cast<uint32_t>(127 - 15) << 23);
  if (exp_mant < 0x0400u) {
    // Half subnormal m * 2^-24: build the normal float 2^-14 * (1 + m/1024)
    // and subtract 2^-14 (exact). Avoids float denormals entirely, so the
    // result is right even where the thread flushes denormals (FTZ/DAZ).
    bits += 1u << 23;
    return BitsToFloat(sign | FloatBits(BitsToFloat(bits) - BitsToFloat(0x38800000u)));
  }
  return BitsToFloat(sign | bits);
}

// binary32 -> binary16, round to nearest even; overflow goes to Inf, NaN stays
// (quiet) NaN, tiny values round into half subnormals or signed zero.
inline uint16_t FloatToHalf(float f) {
  uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) {  // Inf or NaN.
    return sign | (u > 0x7f800000u ? (0x7e00u | ((u >> 13) & 0x3ffu)) : 0x7c00u);
  }
  if (u >= 0x477ff000u) {  // >= 65520 = halfway past the largest half: Inf.
    return sign | 0x7c00u;
  }
  if (u < 0x38800000u) {  // Below 2^-14: result is a half subnormal (or 0).
    // Adding 0.5f aligns the value so that the FPU's own round-to-nearest-even
    // drops exactly the bits a half subnormal cannot hold (ulp 2^-24 = 0.5 *
    // 2^-23); the low mantissa bits then are the half's bits.
    const float shifted = BitsToFloat(u) + 0.5f;
    return sign | static_cast<uint16_t>(FloatBits(shifted) - 0x3f000000u);
  }
  // Normal: rebias exponent (127 -> 15), round the 13 dropped mantissa bits to
  // nearest even (add 0xfff plus the lowest kept bit), let carries ripple
  // into the exponent (which correctly rounds up to the next binade).
  const uint32_t lowest_kept = (u >> 13) & 1u;
  u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + lowest_kept;
  return sign | static_cast<uint16_t>(u >> 13);
}

// bfloat16 is the top half of a float32: widening is a shift.
inline float Bf16ToFloat(uint16_t b) { return BitsToFloat(static_cast<uint32_t>(b) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN stays (quiet) NaN. Overflow
// to Inf happens naturally through the carry into the exponent.
inline uint16_t FloatToBf16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  }
  const uint32_t lowest_kept = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7fffu + lowest_kept) >> 16);
}

}  // namespace jax_marlin

#endif  // JAX_MARLIN_COMMON_FLOAT16_H_
