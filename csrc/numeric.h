// Element conversions between f32, bf16 and f16. Every function is static inline, so each
// translation unit has its own copy: safe to include in the SIMD units, whose inline functions with
// external linkage could otherwise replace the portable ones at link time.
#pragma once

#include <cstdint>
#include <cstring>

namespace qwen2rt {

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays NaN.
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

// IEEE half to float, exact for every input (subnormals, inf, nan included). Branch-free, so loops
// over it vectorise.
static inline float f16_to_f32(uint16_t h) {
    auto bits = [](float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; };
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    const uint32_t exp = em >> 10;
    const uint32_t normal = (em << 13) + (112u << 23);             // rebias 15 -> 127
    const uint32_t infnan = normal + (112u << 23);                 // exponent 31 -> 255, mantissa kept
    const uint32_t sub = bits(float(int32_t(em)) * 0x1p-24f);      // exact: em < 1024
    const uint32_t is_sub = 0u - uint32_t(exp == 0), is_inf = 0u - uint32_t(exp == 31);  // all-ones masks
    const uint32_t u = (sub & is_sub) | (infnan & is_inf) | (normal & ~(is_sub | is_inf));
    float f;
    const uint32_t out = sign | u;
    std::memcpy(&f, &out, 4);
    return f;
}

// float -> IEEE half, round to nearest even (scales only: finite, non-negative or negative).
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));
    if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds past 65504: inf
    if (x < 0x38800000u) {                                    // below 2^-14: subnormal half
        const float v = __builtin_fabsf(f) * 16777216.0f;           // in units of 2^-24
        return uint16_t(sign | uint32_t(__builtin_nearbyintf(v)));
    }
    const uint32_t mant_odd = (x >> 13) & 1u;
    x += 0xfffu + mant_odd;
    return uint16_t(sign | ((x - 0x38000000u) >> 13));
}

// Round to nearest, ties to even, for |v| < 2^22: adding and removing 1.5 * 2^23 leaves the
// float's integer part. Unlike nearbyint (a library call without SSE4.1) it vectorises.
static inline float round_even(float v) { return (v + 12582912.f) - 12582912.f; }

// The attention kernels' softmax in base 2: scores scaled by log2(e), 2^x for x <= 0 as 2^n 2^r with
// r in [-1/2, 1/2] and 2^r by its Taylor series to r^6 (relative error 1.2e-7, about f32's rounding),
// Horner coefficients ln2^k / k! from k = 6 down to 0.
constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
constexpr float kExp2Taylor[7] = {1.5403530393381606e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
                                  5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.f};

}  // namespace qwen2rt
