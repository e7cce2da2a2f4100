/* Element conversions shared by the host kernels (C) and the GPU kernels
 * (nvcc / hipcc): one definition, so both give the same bits. Integer code
 * only (rounding by hand, no libm), little-endian, round-to-nearest-even.
 *
 * fp8 is OCP e4m3 ("e4m3fn": no infinities, 0x7F is NaN, largest 448),
 * stored saturating; int8 is symmetric in [-127, 127], NaN stored as 0. */
#ifndef ROCMFORGE_CONVERT_H
#define ROCMFORGE_CONVERT_H

#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RF_HD static __host__ __device__ __forceinline__
#else
#define RF_HD static inline
#endif

enum { RF_DT_F32 = 0, RF_DT_F16 = 1, RF_DT_BF16 = 2, RF_DT_FP8_E4M3 = 3, RF_DT_I8 = 4 };

RF_HD uint32_t rf_bits(float x) {
    union { float f; uint32_t u; } c;
    c.f = x;
    return c.u;
}

RF_HD float rf_float(uint32_t u) {
    union { float f; uint32_t u; } c;
    c.u = u;
    return c.f;
}

/* Round m >> shift to nearest, ties to even (1 <= shift <= 31). */
RF_HD uint32_t rf_round_shift(uint32_t m, int shift) {
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return q + (rem > half || (rem == half && (q & 1u)));
}

RF_HD uint16_t rf_f32_to_f16_bits(float x) {
    uint32_t u = rf_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu, e;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  /* quiet NaN */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* >= 65520 (or inf): infinity */
    if (a >= 0x38800000u) {                                    /* >= 2^-14: normal */
        uint32_t r = a - 0x38000000u;                          /* rebias the exponent by 127 - 15 */
        r += 0xFFFu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    e = a >> 23;                                               /* subnormal: units of 2^-24 */
    if (e < 102) return (uint16_t)sign;                        /* below 2^-25: zero */
    return (uint16_t)(sign | rf_round_shift((a & 0x7FFFFFu) | 0x800000u, (int)(126 - e)));
}

/* Branch-free, so that loops of it vectorize: a normal number's exponent is
 * rebiased by 127 - 15 (infinity and NaN by twice that, to all ones); a
 * subnormal (or zero) is its mantissa times 2^-24, exact in float. */
RF_HD float rf_f16_bits_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu;
    uint32_t special = 0u - (uint32_t)(em >= 0x7C00u), tiny = 0u - (uint32_t)(em < 0x400u);
    uint32_t wide = (em << 13) + (112u << 23) + (special & (112u << 23));
    uint32_t small = rf_bits((float)(int32_t)em * 5.9604644775390625e-8f);
    return rf_float(sign | (small & tiny) | (wide & ~tiny));
}

RF_HD uint16_t rf_f32_to_bf16_bits(float x) {
    uint32_t u = rf_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  /* quiet NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

RF_HD float rf_bf16_bits_to_f32(uint16_t v) { return rf_float((uint32_t)v << 16); }

RF_HD uint8_t rf_f32_to_e4m3_bits(float x) {
    uint32_t u = rf_bits(x), sign = (u >> 24) & 0x80u, a = u & 0x7FFFFFFFu, e;
    if (a > 0x7F800000u) return (uint8_t)(sign | 0x7Fu);       /* NaN */
    if (a >= 0x43E00000u) return (uint8_t)(sign | 0x7Eu);      /* >= 448 (or inf): saturate */
    if (a >= 0x3C800000u) {                                    /* >= 2^-6: normal */
        uint32_t r = a - 0x3C000000u;                          /* rebias the exponent by 127 - 7 */
        r += 0x7FFFFu + ((r >> 20) & 1u);
        return (uint8_t)(sign | (r >> 20));                    /* below 448 rounds to at most 0x7E */
    }
    e = a >> 23;                                               /* subnormal: units of 2^-9 */
    if (e < 117) return (uint8_t)sign;                         /* below 2^-10: zero */
    return (uint8_t)(sign | rf_round_shift((a & 0x7FFFFFu) | 0x800000u, (int)(141 - e)));
}

RF_HD float rf_e4m3_bits_to_f32(uint8_t v) {
    uint32_t sign = (uint32_t)(v & 0x80u) << 24, e = (v >> 3) & 0xFu, m = v & 7u;
    if ((v & 0x7Fu) == 0x7Fu) return rf_float(0x7FC00000u);
    if (e == 0) {
        if (m == 0) return rf_float(sign);
        e = 1;
        while (!(m & 8u)) {
            m <<= 1;
            e--;
        }
        m &= 7u;
    }
    return rf_float(sign | ((e + 120u) << 23) | (m << 20));
}

/* Round to the nearest integer, ties to even, saturating to [-127, 127]. */
RF_HD int8_t rf_f32_to_i8(float x) {
    uint32_t a;
    int32_t q;
    if (!(x == x)) return 0;                                   /* NaN */
    if (x >= 127.0f) return 127;
    if (x <= -127.0f) return -127;
    a = rf_bits(x) & 0x7FFFFFFFu;
    if (a < 0x3F000000u) return 0;                             /* |x| < 0.5 */
    q = (int32_t)rf_round_shift((a & 0x7FFFFFu) | 0x800000u, (int)(150 - (a >> 23)));
    return (int8_t)(x < 0 ? -q : q);
}

#endif
