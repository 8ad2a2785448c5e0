/* Helpers the kernels share (matvec.c, matvec_mxfp4.c, matvec_exact_xw.c, moe_token.c, rms_norm.c,
 * attention_exact.c). */
#ifndef MOEINF_MATVEC_COMMON_H
#define MOEINF_MATVEC_COMMON_H
#include <stdint.h>
#include <string.h>

static inline float bf16_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> bfloat16 as torch's CPU conversion rounds: to nearest, ties to even; a NaN -> ``nan`` (its vectorized
 * conversions give 0xFFFF, the scalar one at the end of a bfloat16 reduction 0x7FC0). */
static inline uint16_t f32_bf16_nan(float f, uint16_t nan) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return nan;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline uint16_t f32_bf16(float f) { return f32_bf16_nan(f, 0xFFFF); }

#if defined(__AVX2__)
#include <immintrin.h>
/* The sum of a vector's 8 lanes (an AVX2 row's total). */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#endif
