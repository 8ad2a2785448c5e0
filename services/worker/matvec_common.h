/* Helpers the matrix-vector kernels share (matvec.c, matvec_mxfp4.c, matvec_exact_xw.c). */
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
