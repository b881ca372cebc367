/* bfloat16 <-> float32 for the CPU kernels (bgmv.c reads bfloat16 pools, activate.c writes them).
 * bfloat16 is the top half of a float32: widening is a shift, exact; narrowing rounds to nearest
 * even, as torch does, and keeps a NaN a (quiet) NaN. */
#ifndef HOTSWAP_BF16_H
#define HOTSWAP_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v)
{
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        u = (u | 0x00400000u) & 0xffff0000u;
    else
        u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
#endif
