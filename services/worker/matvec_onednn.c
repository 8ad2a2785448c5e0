/* bfloat16 and block-FP8 matrix-vector products in the order oneDNN's brgemm matmul sums them on an AVX-512 BF16 CPU
 * (torch's bfloat16 linears and grouped matmul there; services/worker/onednn_order.py; built into one library with
 * dequant.c, matvec.c and matvec_exact.c by services/worker/dequant_kernel.py).
 *
 * Each output column is one lane; the input columns are taken in pairs, in order, each pair by one vdpbf16ps (the
 * odd column's product added first, then the even one's, float32 rounding after each), in blocks of ``kb`` columns
 * that each start from zero, the blocks' sums added in order. ``kb`` is the block oneDNN uses for the shape
 * (onednn_order.Blocks finds it, bit for bit against torch, before use). 16 output rows at a time: their next 16
 * column pairs loaded as 16 rows of 16 dwords and transposed in registers, so that one vector holds one pair of all
 * 16 rows; the weight is read once, in place (a pool slot), at ~2-2.4x the speed of torch's call (which reorders
 * it). The FP8 kernel turns each block of 16 rows x kb columns into bfloat16 in a small buffer first (the
 * dequantization's bits: byte shuffles of each block's 256 values), then sums it alike; the MXFP4 kernel transposes
 * each 32-column block's bytes across the 16 rows and decodes pair vectors in registers (mxfp4_t16). Nothing else is
 * written. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MVO_AVX512 1
#else
#define MVO_AVX512 0
#endif
#if MVO_AVX512 && defined(__AVX512VBMI__)
#include "fp8_lookup.h"
#define MVO_FP8 1
#else
#define MVO_FP8 0
#endif
#define MVO_STAGE 1024  /* columns of the FP8 kernel's bfloat16 buffer: the widest block it takes (MXFP4's too) */

int moeinf_mv_exact_onednn(void) { return MVO_AVX512; }
int moeinf_mv_exact_onednn_fp8(void) { return MVO_FP8; }
int moeinf_mv_exact_onednn_mxfp4(void) { return MVO_FP8; }  /* the same needs: AVX-512 BF16 and VBMI */

#if MVO_AVX512
static inline void transpose16(__m512i r[16]) {  /* r[i] dword p -> r[p] dword i */
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* r[4g + c]: lane L holds column 4L + c of rows 4g..4g+3 */
    for (int c = 0; c < 4; c++) {
        t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);       /* lanes 0, 2 of rows 0-3, then of rows 4-7 */
        t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);   /* lanes 1, 3 */
        t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);            /* column c */
        r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD);        /* column 8 + c */
        r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);   /* column 4 + c */
        r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xDD);  /* column 12 + c */
    }
}

/* The 16 rows x 32 columns in r (r[i]: row i's 16 column pairs from column c) transposed, then summed into acc[j]
 * for ``nj`` input rows in column-pair order. */
static inline __attribute__((always_inline)) void dot16(__m512i r[16], const uint32_t *xp, int64_t half, int64_t c,
                                                        const int nj, __m512 acc[4]) {
    transpose16(r);  /* r[i]: row i's column pairs c/2.. -> r[p]: pair p of the 16 rows */
#pragma GCC unroll 16
    for (int p = 0; p < 16; p++)
#pragma GCC unroll 4
        for (int j = 0; j < nj; j++)
            acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)r[p],
                                      (__m512bh)_mm512_set1_epi32((int)xp[j * half + c / 2 + p]));
}

/* One block of columns [b, e) of 16 rows (``row[i][c - base]``: column c of row i) into acc[j], from zero, for
 * ``nj`` <= 4 input rows whose column pairs are in ``xp`` (row stride ``half``, zero past the columns: a short last
 * chunk adds zeros). Inlined for each nj, a chunk's 16 pairs unrolled: the transposed vectors stay in registers.
 * ``ahead`` (0: none): the same columns of the next 16 rows, that many elements on, prefetched into L2 (~20% faster
 * on a 14336 x 4096 weight; the hardware's prefetcher alone follows 16 rows less well). */
static inline __attribute__((always_inline)) void block16(const uint16_t *const row[16], int64_t base, int64_t b,
                                                          int64_t e, int64_t ahead, const uint32_t *xp, int64_t half,
                                                          const int nj, __m512 acc[4]) {
    for (int j = 0; j < nj; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t c = b; c < e; c += 32) {
        __mmask32 mask = e - c >= 32 ? 0xFFFFFFFFu : (1u << (e - c)) - 1;
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (ahead)
                _mm_prefetch((const char *)(row[i] + (c - base) + ahead), _MM_HINT_T1);
            r[i] = _mm512_maskz_loadu_epi16(mask, row[i] + (c - base));
        }
        dot16(r, xp, half, c, nj, acc);
    }
}

/* Rows [o, o + 16) of a bfloat16 weight (``nr`` of them real: the others repeat the last and are not stored). */
static inline __attribute__((always_inline)) void rows16(const uint16_t *w, int64_t ld, int nr, int64_t ahead,
                                                         const uint32_t *xp, int64_t half, const int nj, int64_t cols,
                                                         int64_t kb, float *y, int64_t ldy) {
    const uint16_t *row[16];
    for (int i = 0; i < 16; i++) row[i] = w + (i < nr ? i : nr - 1) * ld;
    __m512 total[4], acc[4];
    for (int j = 0; j < 4; j++) total[j] = acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols; b += kb) {
        block16(row, 0, b, b + kb < cols ? b + kb : cols, ahead, xp, half, nj, acc);
        for (int j = 0; j < nj; j++) total[j] = b == 0 ? acc[j] : _mm512_add_ps(total[j], acc[j]);
    }
    __mmask16 out = nr == 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    for (int j = 0; j < nj; j++) _mm512_mask_storeu_ps(y + j * ldy, out, total[j]);
}

/* x's rows as column pairs, each followed by a chunk of zeros; NULL when memory is lacking. */
static uint32_t *pairs_of(const uint16_t *x, int64_t m, int64_t cols, int64_t *half) {
    *half = cols / 2 + 16;
    uint32_t *xp = calloc((size_t)(m * *half), sizeof(uint32_t));
    if (xp != NULL)
        for (int64_t j = 0; j < m; j++) memcpy(xp + j * *half, x + j * cols, (size_t)cols * 2);
    return xp;
}
#endif

/* Returns 0, or -1 when this build has no AVX-512 BF16, the shape is not one it takes (cols odd, kb not a multiple
 * of 32) or memory is lacking. */
MOEINF_HIDDEN int moeinf_mv_onednn_nt_rows(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols,
                                    int64_t lo, int64_t hi, float *y, int64_t ldy, int64_t kb) {
#if MVO_AVX512
    int64_t half;
    uint32_t *xp = cols % 2 || kb <= 0 || kb % 32 ? NULL : pairs_of(x, m, cols, &half);
    if (xp == NULL)
        return -1;
    for (int64_t o = lo; o < hi; o += 16) {
        int nr = hi - o < 16 ? (int)(hi - o) : 16;
        int64_t ahead = o + 32 <= hi ? 16 * ld : 0;  /* the next 16 rows, when they are this call's */
        for (int64_t j = 0; j < m; j += 4) {
            const uint32_t *xj = xp + j * half;
            float *yj = y + j * ldy + o;
            switch (m - j < 4 ? (int)(m - j) : 4) {
            case 1: rows16(w + o * ld, ld, nr, ahead, xj, half, 1, cols, kb, yj, ldy); break;
            case 2: rows16(w + o * ld, ld, nr, ahead, xj, half, 2, cols, kb, yj, ldy); break;
            case 3: rows16(w + o * ld, ld, nr, ahead, xj, half, 3, cols, kb, yj, ldy); break;
            default: rows16(w + o * ld, ld, nr, ahead, xj, half, 4, cols, kb, yj, ldy); break;
            }
        }
    }
    free(xp);
    return 0;
#else
    (void)w; (void)ld; (void)x; (void)m; (void)cols; (void)lo; (void)hi; (void)y; (void)ldy; (void)kb;
    return -1;
#endif
}

#if MVO_FP8
/* Rows [o, o + 16) of an FP8 weight, ``nr`` real, block by block through ``stage`` (16 x MVO_STAGE bfloat16). */
static inline __attribute__((always_inline)) void fp8_rows16(const uint8_t *v, int64_t ld, int nr,
                                                             uint8_t planes[][2][256], int64_t block_c,
                                                             uint16_t (*stage)[MVO_STAGE], const uint32_t *xp,
                                                             int64_t half, const int nj, int64_t cols, int64_t kb,
                                                             float *y, int64_t ldy) {
    const uint16_t *row[16];
    for (int i = 0; i < 16; i++) row[i] = stage[i < nr ? i : nr - 1];
    __m512 total[4], acc[4];
    for (int j = 0; j < 4; j++) total[j] = acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols; b += kb) {
        int64_t e = b + kb < cols ? b + kb : cols;
        for (int64_t c = b; c < e; c += 64) {
            __m512i lo[4], hi[4];
            for (int k = 0; k < 4; k++) {
                lo[k] = _mm512_loadu_si512(planes[c / block_c][0] + 64 * k);
                hi[k] = _mm512_loadu_si512(planes[c / block_c][1] + 64 * k);
            }
            for (int i = 0; i < nr; i++) fp8_lookup64(v + i * ld + c, stage[i] + (c - b), lo, hi);
        }
        block16(row, b, b, e, 0, xp, half, nj, acc);
        for (int j = 0; j < nj; j++) total[j] = b == 0 ? acc[j] : _mm512_add_ps(total[j], acc[j]);
    }
    __mmask16 out = nr == 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    for (int j = 0; j < nj; j++) _mm512_mask_storeu_ps(y + j * ldy, out, total[j]);
}
#endif

/* y[j][o] = sum_i x[j][i] * W[o][i] for a block-FP8 weight (``v`` [rows][ld] bytes under ``scales`` [rows /
 * block_r][cols / block_c] float32; ``table``: the 256 float32 values of the FP8 bytes), each weight the
 * dequantization's bfloat16, in oneDNN's order. Returns 0, or -1 when this build has no AVX-512 BF16 and VBMI or the
 * layout is not one it takes (widths and column blocks multiples of 64, row blocks and ``lo`` of 16, at most 256
 * column blocks, kb a multiple of 64 up to MVO_STAGE) or memory is lacking. */
MOEINF_HIDDEN int moeinf_mv_onednn_fp8_nt_rows(const uint8_t *v, int64_t ld, const float *scales, const float *table,
                                        int64_t block_r, int64_t block_c, const uint16_t *x, int64_t m, int64_t cols,
                                        int64_t lo, int64_t hi, float *y, int64_t ldy, int64_t kb) {
#if MVO_FP8
    if (block_c <= 0 || block_r <= 0 || cols % 64 || block_c % 64 || cols % block_c || cols / block_c > 256
        || block_r % 16 || lo % 16 || kb <= 0 || kb % 64 || kb > MVO_STAGE)
        return -1;
    static __thread uint8_t planes[256][2][256] __attribute__((aligned(64)));  /* [column block][low, high][entry] */
    static __thread uint16_t stage[16][MVO_STAGE] __attribute__((aligned(64)));
    int64_t half, grid_c = cols / block_c, planes_of = -1;
    uint32_t *xp = pairs_of(x, m, cols, &half);
    if (xp == NULL)
        return -1;
    for (int64_t o = lo; o < hi; o += 16) {
        int nr = hi - o < 16 ? (int)(hi - o) : 16;
        if (o / block_r != planes_of)
            fp8_block_planes(planes, scales, table, planes_of = o / block_r, grid_c);
        for (int64_t j = 0; j < m; j += 4) {
            const uint32_t *xj = xp + j * half;
            float *yj = y + j * ldy + o;
            const uint8_t *vo = v + o * ld;
            switch (m - j < 4 ? (int)(m - j) : 4) {
            case 1: fp8_rows16(vo, ld, nr, planes, block_c, stage, xj, half, 1, cols, kb, yj, ldy); break;
            case 2: fp8_rows16(vo, ld, nr, planes, block_c, stage, xj, half, 2, cols, kb, yj, ldy); break;
            case 3: fp8_rows16(vo, ld, nr, planes, block_c, stage, xj, half, 3, cols, kb, yj, ldy); break;
            default: fp8_rows16(vo, ld, nr, planes, block_c, stage, xj, half, 4, cols, kb, yj, ldy); break;
            }
        }
    }
    free(xp);
    return 0;
#else
    (void)v; (void)ld; (void)scales; (void)table; (void)block_r; (void)block_c; (void)x; (void)m; (void)cols;
    (void)lo; (void)hi; (void)y; (void)ldy; (void)kb;
    return -1;
#endif
}

#if MVO_AVX512
#include "mxfp4_decode.h"

#if defined(__AVX512VBMI__)
/* 16 bytes at ``row[i] + off`` for the 16 rows (only the first ones ``m`` keeps: the others read as zero), transposed:
 * u[0] byte 8k + r = byte k (< 8) of row r (< 8), u[1] the same of rows 8..15, u[2] and u[3] bytes 8..15. */
static inline __attribute__((always_inline)) void bytes16x16(const uint8_t *const row[16], int64_t off, __mmask16 m,
                                                             __m512i u[4]) {
    static const uint8_t order[2][64] __attribute__((aligned(64))) = {
#define MX_T(k, r) (uint8_t)(((r) / 4) * 64 + 16 * ((r) % 4) + (k))
#define MX_ROW8(k) MX_T(k, 0), MX_T(k, 1), MX_T(k, 2), MX_T(k, 3), MX_T(k, 4), MX_T(k, 5), MX_T(k, 6), MX_T(k, 7)
        {MX_ROW8(0), MX_ROW8(1), MX_ROW8(2), MX_ROW8(3), MX_ROW8(4), MX_ROW8(5), MX_ROW8(6), MX_ROW8(7)},
        {MX_ROW8(8), MX_ROW8(9), MX_ROW8(10), MX_ROW8(11), MX_ROW8(12), MX_ROW8(13), MX_ROW8(14), MX_ROW8(15)},
#undef MX_ROW8
#undef MX_T
    };
    __m512i z[4];
    for (int k = 0; k < 4; k++) {  /* rows 4k..4k+3 */
        __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(m, row[4 * k] + off));
        v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(m, row[4 * k + 1] + off), 1);
        v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(m, row[4 * k + 2] + off), 2);
        z[k] = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(m, row[4 * k + 3] + off), 3);
    }
    const __m512i lo = _mm512_load_si512(order[0]), hi = _mm512_load_si512(order[1]);
    u[0] = _mm512_permutex2var_epi8(z[0], lo, z[1]);
    u[1] = _mm512_permutex2var_epi8(z[2], lo, z[3]);
    u[2] = _mm512_permutex2var_epi8(z[0], hi, z[1]);
    u[3] = _mm512_permutex2var_epi8(z[2], hi, z[3]);
}

/* Byte k of the 16 rows transposed by bytes16x16, one per dword lane (lane i: row i), the rest of each lane zero. */
static inline __attribute__((always_inline)) __m512i byte_lanes(const __m512i u[4], int k) {
    const __m512i lanes = _mm512_set_epi32(71, 70, 69, 68, 67, 66, 65, 64, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_maskz_permutex2var_epi8(0x1111111111111111ull, u[k < 8 ? 0 : 2],
                                          _mm512_add_epi32(lanes, _mm512_set1_epi32(8 * (k % 8))), u[k < 8 ? 1 : 3]);
}

/* One 32-column block (byte offset g * 16 of each row) of 16 MXFP4 rows whose scale bytes ``scale`` (one per dword
 * lane) are all in 2..252, summed into acc[j] in column-pair order: the rows' bytes transposed first (byte p of a
 * block holds column pair p, low nibble the even column), so that one byte shuffle gives pair p of all 16 rows, one
 * per lane; each lane's two nibbles are then decoded as mxfp4_decode.h decodes (a word shuffle of the E2M1 codes'
 * bfloat16 bits, the row's (scale - 127) << 7 added where the magnitude is not zero). A quarter of the shuffles of
 * decoding, then transposing, bfloat16 vectors. */
static inline __attribute__((always_inline)) void mxfp4_t16(const uint8_t *const brow[16], int64_t g, __m512i scale,
                                                            const uint32_t *xp, int64_t half, int64_t c,
                                                            const int nj, __m512 acc[4]) {
    __m512i u[4];
    bytes16x16(brow, g * 16, 0xFFFF, u);
    const __m512i codes = mxfp4_codes(), seven = _mm512_set1_epi16(7), nibbles = _mm512_set1_epi32(0x000F000F);
    __m512i delta = _mm512_and_si512(_mm512_slli_epi32(_mm512_sub_epi32(scale, _mm512_set1_epi32(127)), 7),
                                     _mm512_set1_epi32(0xFFFF));
    delta = _mm512_or_si512(delta, _mm512_slli_epi32(delta, 16));  /* both words of the lane */
#pragma GCC unroll 16
    for (int p = 0; p < 16; p++) {
        __m512i bytes = byte_lanes(u, p);
        __m512i n = _mm512_ternarylogic_epi32(bytes, _mm512_slli_epi32(bytes, 12), nibbles, 0xA8);  /* (a | b) & c */
        __m512i v = _mm512_permutexvar_epi16(n, codes);
        v = _mm512_mask_add_epi16(v, _mm512_test_epi16_mask(n, seven), v, delta);
#pragma GCC unroll 4
        for (int j = 0; j < nj; j++)
            acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)v,
                                      (__m512bh)_mm512_set1_epi32((int)xp[j * half + c / 2 + p]));
    }
}
#endif

/* Rows [o, o + 16) of an MXFP4 weight, ``nr`` real, 32 columns at a time: with AVX-512 VBMI by mxfp4_t16 where
 * the 16 rows' scale bytes are all ones it computes, else (and without VBMI) each row's block turned into bfloat16
 * (mxfp4_decode.h: any scale) and transposed as bfloat16 weights are; summed in oneDNN's order either way. */
static inline __attribute__((always_inline)) void mxfp4_rows16(const uint8_t *blocks, int64_t ld,
                                                               const uint8_t *scales, int64_t lds, int nr,
                                                               const uint32_t *pairs, const uint32_t *xp,
                                                               int64_t half, const int nj, int64_t cols, int64_t kb,
                                                               float *y, int64_t ldy) {
    const uint8_t *brow[16], *srow[16];
    for (int i = 0; i < 16; i++) {
        brow[i] = blocks + (i < nr ? i : nr - 1) * ld;
        srow[i] = scales + (i < nr ? i : nr - 1) * lds;
    }
    __m512 total[4], acc[4];
#if defined(__AVX512VBMI__)
    __m512i su[4];
#endif
    for (int j = 0; j < 4; j++) total[j] = acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols; b += kb) {
        int64_t e = b + kb < cols ? b + kb : cols;
        for (int j = 0; j < nj; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t c = b; c < e; c += 32) {
            int64_t g = c / 32;
#if defined(__AVX512VBMI__)
            int k = (int)((c - b) / 32 % 16);
            if (k == 0) {  /* the scale bytes of the next 16 blocks (or fewer), transposed once */
                int64_t left = (e - c) / 32;
                bytes16x16(srow, g, left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1), su);
            }
            __m512i scale = byte_lanes(su, k);
            if (!_mm512_cmpgt_epu32_mask(_mm512_sub_epi32(scale, _mm512_set1_epi32(2)), _mm512_set1_epi32(250))) {
                mxfp4_t16(brow, g, scale, xp, half, c, nj, acc);
                continue;
            }
#endif
            uint32_t stage[16][16] __attribute__((aligned(64)));
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                mxfp4_block(brow[i] + g * 16, srow[i][g], pairs, stage[i]);
                r[i] = _mm512_load_si512(stage[i]);
            }
            dot16(r, xp, half, c, nj, acc);
        }
        for (int j = 0; j < nj; j++) total[j] = b == 0 ? acc[j] : _mm512_add_ps(total[j], acc[j]);
    }
    __mmask16 out = nr == 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    for (int j = 0; j < nj; j++) _mm512_mask_storeu_ps(y + j * ldy, out, total[j]);
}
#endif

/* y[j][o] = sum_i x[j][i] * W[o][i] for an MXFP4 weight (``blocks`` [rows][ld] bytes, 16 per 32 columns, low nibble
 * first; ``scales`` [rows][lds] E8M0 bytes; ``pairs``: quant.mxfp4_table's bfloat16 pairs for the scales dequant.c
 * does not compute), each weight the dequantization's bfloat16, in oneDNN's order. Returns 0, or -1 when this build
 * has no AVX-512 BF16, the layout is not one it takes (widths and kb multiples of 32, kb up to MVO_STAGE) or memory
 * is lacking. */
MOEINF_HIDDEN int moeinf_mv_onednn_mxfp4_nt_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                          const uint32_t *pairs, const uint16_t *x, int64_t m, int64_t cols,
                                          int64_t lo, int64_t hi, float *y, int64_t ldy, int64_t kb) {
#if MVO_AVX512
    if (cols % 32 || kb <= 0 || kb % 32 || kb > MVO_STAGE)
        return -1;
    int64_t half;
    uint32_t *xp = pairs_of(x, m, cols, &half);
    if (xp == NULL)
        return -1;
    for (int64_t o = lo; o < hi; o += 16) {
        int nr = hi - o < 16 ? (int)(hi - o) : 16;
        const uint8_t *bo = blocks + o * ld, *so = scales + o * lds;
        for (int64_t j = 0; j < m; j += 4) {
            const uint32_t *xj = xp + j * half;
            float *yj = y + j * ldy + o;
            switch (m - j < 4 ? (int)(m - j) : 4) {
            case 1: mxfp4_rows16(bo, ld, so, lds, nr, pairs, xj, half, 1, cols, kb, yj, ldy); break;
            case 2: mxfp4_rows16(bo, ld, so, lds, nr, pairs, xj, half, 2, cols, kb, yj, ldy); break;
            case 3: mxfp4_rows16(bo, ld, so, lds, nr, pairs, xj, half, 3, cols, kb, yj, ldy); break;
            default: mxfp4_rows16(bo, ld, so, lds, nr, pairs, xj, half, 4, cols, kb, yj, ldy); break;
            }
        }
    }
    free(xp);
    return 0;
#else
    (void)blocks; (void)ld; (void)scales; (void)lds; (void)pairs; (void)x; (void)m; (void)cols; (void)lo; (void)hi;
    (void)y; (void)ldy; (void)kb;
    return -1;
#endif
}
