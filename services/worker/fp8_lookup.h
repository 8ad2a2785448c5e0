/* FP8 bytes -> 2-byte values with AVX-512 VBMI (dequant.c, matvec_onednn.c): the block's 256-entry table split into
 * its low-byte and high-byte planes (4 vectors each), then 64 lookups at a time: two 128-entry byte shuffles
 * (vpermt2b) per plane, the byte's top bit picks between them, and the planes interleave back into 2-byte values,
 * stored in the bytes' order. */
#ifndef MOEINF_FP8_LOOKUP_H
#define MOEINF_FP8_LOOKUP_H
#if defined(__AVX512VBMI__) && defined(__AVX512BW__) && defined(__GNUC__)
#include <immintrin.h>
#include <stdint.h>

static inline void fp8_lookup64(const uint8_t *v, uint16_t *o, const __m512i lo[4], const __m512i hi[4]) {
    const __m512i even = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), odd = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    __m512i idx = _mm512_loadu_si512(v);
    __mmask64 top = _mm512_movepi8_mask(idx);
    __m512i l = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(lo[0], idx, lo[1]),
                                       _mm512_permutex2var_epi8(lo[2], idx, lo[3]));
    __m512i h = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(hi[0], idx, hi[1]),
                                       _mm512_permutex2var_epi8(hi[2], idx, hi[3]));
    __m512i a = _mm512_unpacklo_epi8(l, h), b = _mm512_unpackhi_epi8(l, h);  /* per 128-bit lane: values 0-7, 8-15 */
    _mm512_storeu_si512(o, _mm512_permutex2var_epi64(a, even, b));
    _mm512_storeu_si512(o + 32, _mm512_permutex2var_epi64(a, odd, b));
}
#endif
#endif
