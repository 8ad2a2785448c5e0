/* MXFP4 matrix-vector products for decode steps, the fast kernels (sums in another order than torch's, like
 * matvec.c's; the exact ones are in matvec_exact.c, matvec_exact_xw.c and matvec_onednn.c). Built into one library
 * with the other kernels by services/worker/dequant_kernel.py; entered through matvec_threads.c. */
#include <stdint.h>
#include <string.h>

#include "matvec_common.h"
#include "parallel.h"

/* MXFP4 matrix-vector products: each 16-byte block (32 E2M1 values, low nibble first) decoded into bfloat16 in
 * registers under its E8M0 scale, with dequant.c's arithmetic (exact for scale bytes 2..252; a weight with any
 * other scale is declined: -1) and multiplied there: y[j][o] = sum_i x[j][i] * w(o, i). blocks: [rows][cols / 32]
 * blocks of 16 bytes, row stride ld bytes; scales: [rows][cols / 32] bytes, row stride lds. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MX_FAST 1
#define MX_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MX_FAST 1
#define MX_AVX2 1
#else
#define MX_FAST 0
#define MX_AVX2 0
#endif

int moeinf_mv_mxfp4_fast(void) { return MX_FAST; }

#if MX_FAST && !MX_AVX2
#define MX_ROWS 8
MOEINF_HIDDEN int moeinf_mv_mxfp4_nt_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                   const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y,
                                   int64_t ldy) {
    int64_t groups = cols / 32;
    if (cols % 32 || lo % MX_ROWS)
        return -1;
    for (int64_t o = lo; o < hi; o++)
        for (int64_t g = 0; g < groups; g++)
            if (scales[o * lds + g] < 2 || scales[o * lds + g] > 252)
                return -1;
    /* the bfloat16 bits of E2M1 code n under scale 127 (sign included; zero stays zero) */
    uint32_t base[16];
    for (int n = 0; n < 16; n++) {
        uint32_t mag = n & 7;
        uint32_t bits = mag ? ((mag + 252) << 6) - (mag == 1 ? 64 : 0) : 0;
        base[n] = bits | ((uint32_t)(n & 8) << 12);
    }
    const __m512i table = _mm512_loadu_si512(base), low4 = _mm512_set1_epi32(15), mag = _mm512_set1_epi16(0x7fff);
    for (int64_t o = lo; o < hi; o += MX_ROWS) {
        int64_t nr = hi - o < MX_ROWS ? hi - o : MX_ROWS;
        for (int64_t j = 0; j < m; j++) {
            __m512 acc[MX_ROWS];
            for (int r = 0; r < MX_ROWS; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(x + j * cols + g * 32);
                for (int r = 0; r < nr; r++) {
                    const uint8_t *p = blocks + (o + r) * ld + g * 16;
                    _mm_prefetch((const char *)(p + MX_ROWS * ld), _MM_HINT_T1);
                    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
                    __m512i wl = _mm512_permutexvar_epi32(_mm512_and_si512(v, low4), table);
                    __m512i wh = _mm512_permutexvar_epi32(_mm512_srli_epi32(v, 4), table);  /* v < 256: no mask */
                    __m512i w = _mm512_or_si512(wl, _mm512_slli_epi32(wh, 16));
                    __m512i delta = _mm512_set1_epi16((short)((scales[(o + r) * lds + g] - 127) << 7));
                    w = _mm512_mask_add_epi16(w, _mm512_test_epi16_mask(w, mag), w, delta);
                    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)w, xv);
                }
            }
            for (int r = 0; r < nr; r++) y[j * ldy + o + r] = _mm512_reduce_add_ps(acc[r]);
        }
    }
    return 0;
}
#elif MX_AVX2
/* AVX2 and FMA: per block, the 8 E2M1 magnitudes times 2^(scale - 127) (exact: a power of two, scales 2..252 keep
 * them normal, and each is then a bfloat16 value, the dequantization's), looked up per nibble by an 8-lane permute,
 * the nibble's sign bit put on; x is taken in the order the nibbles come (per 32 columns: the 8 low nibbles' columns
 * of the first 8 bytes, their high nibbles', then the next 8 bytes'), widened to float32 once per call. */
#define MX_ROWS 4
#define MX_COLS 16384

MOEINF_HIDDEN int moeinf_mv_mxfp4_nt_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                   const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y,
                                   int64_t ldy) {
    int64_t groups = cols / 32;
    if (cols % 32 || cols > MX_COLS || m > 4)
        return -1;
    for (int64_t o = lo; o < hi; o++)
        for (int64_t g = 0; g < groups; g++)
            if (scales[o * lds + g] < 2 || scales[o * lds + g] > 252)
                return -1;
    static __thread float xp[4][MX_COLS] __attribute__((aligned(32)));
    for (int64_t j = 0; j < m; j++)
        for (int64_t c = 0; c < cols; c += 32)
            for (int h = 0; h < 2; h++)      /* bytes 0-7, then 8-15 of the block */
                for (int k = 0; k < 8; k++) {  /* byte 8h + k holds columns c + 16h + 2k (low), + 1 (high) */
                    xp[j][c + 16 * h + k] = bf16_f32(x[j * cols + c + 16 * h + 2 * k]);
                    xp[j][c + 16 * h + 8 + k] = bf16_f32(x[j * cols + c + 16 * h + 2 * k + 1]);
                }
    const __m256 mags = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000);
    for (int64_t o = lo; o < hi; o += MX_ROWS) {
        int64_t nr = hi - o < MX_ROWS ? hi - o : MX_ROWS;
        for (int64_t j = 0; j < m; j++) {
            __m256 acc[MX_ROWS];
            for (int r = 0; r < MX_ROWS; r++) acc[r] = _mm256_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                const float *xg = xp[j] + g * 32;
                for (int r = 0; r < nr; r++) {
                    const uint8_t *p = blocks + (o + r) * ld + g * 16;
                    if ((g & 3) == 0)
                        _mm_prefetch((const char *)(p + 2 * MX_ROWS * ld), _MM_HINT_T1);  /* two blocks ahead */
                    __m256 tab = _mm256_mul_ps(mags, _mm256_castsi256_ps(
                        _mm256_set1_epi32((int)((uint32_t)scales[(o + r) * lds + g] << 23))));
                    __m128i raw = _mm_loadu_si128((const __m128i *)p);
                    for (int h = 0; h < 2; h++) {
                        __m256i v = _mm256_cvtepu8_epi32(h ? _mm_unpackhi_epi64(raw, raw) : raw);
                        __m256i vh = _mm256_srli_epi32(v, 4);
                        __m256 wl = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(
                            _mm256_permutevar8x32_ps(tab, v)), _mm256_and_si256(_mm256_slli_epi32(v, 28), sign)));
                        __m256 wh = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(
                            _mm256_permutevar8x32_ps(tab, vh)), _mm256_and_si256(_mm256_slli_epi32(v, 24), sign)));
                        acc[r] = _mm256_fmadd_ps(wl, _mm256_load_ps(xg + 16 * h), acc[r]);
                        acc[r] = _mm256_fmadd_ps(wh, _mm256_load_ps(xg + 16 * h + 8), acc[r]);
                    }
                }
            }
            for (int r = 0; r < nr; r++) y[j * ldy + o + r] = hsum8(acc[r]);
        }
    }
    return 0;
}
#else
MOEINF_HIDDEN int moeinf_mv_mxfp4_nt_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                   const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y,
                                   int64_t ldy) {
    return -1;
}
#endif
