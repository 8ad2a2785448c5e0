/* Block-FP8 bytes -> bfloat16 (dequant.c, matvec.c, matvec_onednn.c). Each block's 256 values times its scale,
 * rounded once as torch rounds, split into a low-byte and a high-byte plane; with AVX-512 VBMI, 64 lookups at a time:
 * two 128-entry byte shuffles (vpermt2b) per plane, the byte's top bit picks between them. */
#ifndef MOEINF_FP8_LOOKUP_H
#define MOEINF_FP8_LOOKUP_H
#include <stdint.h>
#include <string.h>

static inline uint16_t fp8_f32_bf16(float f) {  /* round to nearest even, as torch converts (NaN -> 0x7fc0) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* The planes of row block ``rb``'s column blocks: each byte's value (``table``) times the block's scale. */
static inline void fp8_block_planes(uint8_t planes[][2][256], const float *scales, const float *table, int64_t rb,
                                    int64_t grid_c) {
    for (int64_t cb = 0; cb < grid_c; cb++) {
        float s = scales[rb * grid_c + cb];
        for (int i = 0; i < 256; i++) {
            uint16_t v = fp8_f32_bf16(table[i] * s);
            planes[cb][0][i] = (uint8_t)v;
            planes[cb][1][i] = (uint8_t)(v >> 8);
        }
    }
}

#if defined(__AVX512VBMI__) && defined(__AVX512BW__) && defined(__GNUC__)
#include <immintrin.h>

/* 64 bytes' low (``*l``) and high (``*h``) bytes of their values, from the planes ``lo``, ``hi`` (4 vectors each). */
static inline void fp8_lookup_planes(__m512i idx, const __m512i lo[4], const __m512i hi[4], __m512i *l, __m512i *h) {
    __mmask64 top = _mm512_movepi8_mask(idx);
    *l = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(lo[0], idx, lo[1]),
                                _mm512_permutex2var_epi8(lo[2], idx, lo[3]));
    *h = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(hi[0], idx, hi[1]),
                                _mm512_permutex2var_epi8(hi[2], idx, hi[3]));
}

/* 64 bytes at ``v`` into 64 2-byte values at ``o``, in the bytes' order. */
static inline void fp8_lookup64(const uint8_t *v, uint16_t *o, const __m512i lo[4], const __m512i hi[4]) {
    const __m512i even = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), odd = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    __m512i l, h;
    fp8_lookup_planes(_mm512_loadu_si512(v), lo, hi, &l, &h);
    __m512i a = _mm512_unpacklo_epi8(l, h), b = _mm512_unpackhi_epi8(l, h);  /* per 128-bit lane: values 0-7, 8-15 */
    _mm512_storeu_si512(o, _mm512_permutex2var_epi64(a, even, b));
    _mm512_storeu_si512(o + 32, _mm512_permutex2var_epi64(a, odd, b));
}
#endif
#endif
