/* MXFP4 blocks -> bfloat16 (dequant.c, matvec_onednn.c): the dequantization's bits, computed where the scale byte is
 * in 2..252 (the E2M1 value's bfloat16 bits with the scale added to the exponent, exact because the product of a
 * normal value and a representable power of two is exact), looked up in transformers' table otherwise. */
#ifndef MOEINF_MXFP4_DECODE_H
#define MOEINF_MXFP4_DECODE_H
#include <stdint.h>
#include <string.h>

typedef uint8_t mx_u8x16 __attribute__((vector_size(16)));
typedef uint16_t mx_u16x16 __attribute__((vector_size(32)));
typedef uint32_t mx_u32x16 __attribute__((vector_size(64)));

/* bfloat16 bits of E2M1 codes n (sign bit 8, magnitude 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6) times 2^(scale - 127),
 * delta = (scale - 127) << 7 modulo 2^16. Magnitude m >= 2 is 2^(m/2 - 1) * (1 + (m & 1) / 2): exponent field
 * m / 2 + 126, mantissa top bit m & 1, i.e. (m + 252) << 6; 0.5 is 252 << 6; zero stays zero (signed). */
static inline mx_u16x16 e2m1_bf16(mx_u16x16 n, uint16_t delta) {
    mx_u16x16 mag = n & 7;
    mx_u16x16 bits = ((mag + 252) << 6) - ((mx_u16x16)(mag == 1) & 64) + delta;
    bits &= (mx_u16x16)(mag != 0);
    return bits | ((n & 8) << 12);
}

/* One block the portable way: computed for scale bytes 2..252, else from the table. */
static inline void mxfp4_block(const uint8_t *b, uint32_t s, const uint32_t *pairs, uint32_t *o) {
    if (s >= 2 && s <= 252) {
        mx_u8x16 v;
        memcpy(&v, b, 16);
        mx_u16x16 n = __builtin_convertvector(v, mx_u16x16);
        uint16_t delta = (uint16_t)((s - 127u) << 7);
        mx_u32x16 lo = __builtin_convertvector(e2m1_bf16(n & 15, delta), mx_u32x16);
        mx_u32x16 hi = __builtin_convertvector(e2m1_bf16(n >> 4, delta), mx_u32x16);
        mx_u32x16 r = lo | (hi << 16);
        memcpy(o, &r, 64);
    } else {
        const uint32_t *t = pairs + ((size_t)s << 8);
        for (int j = 0; j < 16; j++) o[j] = t[b[j]];
    }
}

#if defined(__AVX512BW__) && defined(__AVX512F__) && defined(__GNUC__)
#include <immintrin.h>
#define MXFP4_AVX512 1
static inline __m512i mxfp4_codes(void) {  /* the bfloat16 bits of the 16 E2M1 codes at scale 127, one per word */
    return _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                            (short)0xC0C0, (short)0xC080, (short)0xC040, (short)0xC000,
                            (short)0xBFC0, (short)0xBF80, (short)0xBF00, (short)0x8000,
                            0x40C0, 0x4080, 0x4040, 0x4000, 0x3FC0, 0x3F80, 0x3F00, 0x0000);
}

/* Two blocks (32 bytes, 64 values) at once, both scale bytes in 2..252: each nibble widened to a 16-bit code, its
 * bfloat16 bits at scale 127 looked up by one word shuffle (the codes' table: E2M1 magnitude m >= 2 is (m + 252) << 6,
 * 0.5 is 252 << 6, zero stays zero, bit 3 the sign), the block's (scale - 127) << 7 added where the magnitude is not
 * zero (the same bits as e2m1_bf16 above), then low and high nibbles interleaved back into value order. */
static inline void mxfp4_pair_avx512(const uint8_t *b, uint16_t d0, uint16_t d1, uint16_t *o) {
    const __m512i table = mxfp4_codes();
    const __m512i even = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                          39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(16));
    __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)b));  /* block 0 words 0-15, block 1 16-31 */
    __m512i lo = _mm512_and_si512(w, _mm512_set1_epi16(15)), hi = _mm512_srli_epi16(w, 4);
    __m512i delta = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16((short)d0), _mm512_set1_epi16((short)d1));
    __m512i l = _mm512_permutexvar_epi16(lo, table), h = _mm512_permutexvar_epi16(hi, table);
    l = _mm512_mask_add_epi16(l, _mm512_test_epi16_mask(lo, _mm512_set1_epi16(7)), l, delta);
    h = _mm512_mask_add_epi16(h, _mm512_test_epi16_mask(hi, _mm512_set1_epi16(7)), h, delta);
    _mm512_storeu_si512(o, _mm512_permutex2var_epi16(l, even, h));       /* block 0: lo0 hi0 lo1 hi1 ... */
    _mm512_storeu_si512(o + 32, _mm512_permutex2var_epi16(l, odd, h));   /* block 1 */
}
#endif

/* n_blocks MXFP4 blocks (16 bytes = 32 values, low nibble first) with one E8M0 scale byte each, into bfloat16
 * pairs. pairs: the [256 scales][256 bytes] table of both values of a byte as one uint32 (quant.mxfp4_table). With
 * AVX-512BW two blocks at a time by word shuffles (~2x the portable loop on one core). */
static inline void mxfp4_decode(const uint8_t *blocks, const uint8_t *scales, const uint32_t *pairs, uint32_t *out,
                                int64_t n_blocks) {
    int64_t i = 0;
#if defined(MXFP4_AVX512)
    for (; i + 2 <= n_blocks; i += 2) {
        uint32_t s0 = scales[i], s1 = scales[i + 1];
        if (s0 - 2u <= 250u && s1 - 2u <= 250u)
            mxfp4_pair_avx512(blocks + i * 16, (uint16_t)((s0 - 127u) << 7), (uint16_t)((s1 - 127u) << 7),
                              (uint16_t *)(out + i * 16));
        else {
            mxfp4_block(blocks + i * 16, s0, pairs, out + i * 16);
            mxfp4_block(blocks + (i + 1) * 16, s1, pairs, out + (i + 1) * 16);
        }
    }
#endif
    for (; i < n_blocks; i++)
        mxfp4_block(blocks + i * 16, scales[i], pairs, out + i * 16);
}
#endif
