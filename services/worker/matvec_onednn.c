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
 * it). The FP8 and MXFP4 kernels turn each block of 16 rows x kb columns into bfloat16 in a small buffer first (the
 * dequantization's bits: FP8 by byte shuffles of each block's 256 values, MXFP4 by dequant.c's word shuffles), then
 * sum it alike: nothing else is written. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
#define MVO_STAGE 1024  /* columns of the FP8 and MXFP4 kernels' bfloat16 buffer: the widest block they take */

int moeinf_mv_exact_onednn(void) { return MVO_AVX512; }
int moeinf_mv_exact_onednn_fp8(void) { return MVO_FP8; }

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
        transpose16(r);
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++)
#pragma GCC unroll 4
            for (int j = 0; j < nj; j++)
                acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)r[p],
                                          (__m512bh)_mm512_set1_epi32((int)xp[j * half + c / 2 + p]));
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
int moeinf_mv_onednn_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                        int64_t hi, float *y, int64_t ldy, int64_t kb) {
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
int moeinf_mv_onednn_fp8_nt(const uint8_t *v, int64_t ld, const float *scales, const float *table, int64_t block_r,
                            int64_t block_c, const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi,
                            float *y, int64_t ldy, int64_t kb) {
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

/* Rows [o, o + 16) of an MXFP4 weight, ``nr`` real, block by block through ``stage``: each row's blocks of the
 * column block turned into bfloat16 (mxfp4_decode.h), then summed as bfloat16 weights are. */
static inline __attribute__((always_inline)) void mxfp4_rows16(const uint8_t *blocks, int64_t ld,
                                                               const uint8_t *scales, int64_t lds, int nr,
                                                               const uint32_t *pairs,
                                                               uint16_t (*stage)[MVO_STAGE], const uint32_t *xp,
                                                               int64_t half, const int nj, int64_t cols, int64_t kb,
                                                               float *y, int64_t ldy) {
    const uint16_t *row[16];
    for (int i = 0; i < 16; i++) row[i] = stage[i < nr ? i : nr - 1];
    __m512 total[4], acc[4];
    for (int j = 0; j < 4; j++) total[j] = acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols; b += kb) {
        int64_t e = b + kb < cols ? b + kb : cols;
        for (int i = 0; i < nr; i++)
            mxfp4_decode(blocks + i * ld + b / 2, scales + i * lds + b / 32, pairs, (uint32_t *)stage[i],
                         (e - b) / 32);
        block16(row, b, b, e, 0, xp, half, nj, acc);
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
int moeinf_mv_onednn_mxfp4_nt(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                              const uint32_t *pairs, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                              int64_t hi, float *y, int64_t ldy, int64_t kb) {
#if MVO_AVX512
    if (cols % 32 || kb <= 0 || kb % 32 || kb > MVO_STAGE)
        return -1;
    static __thread uint16_t stage[16][MVO_STAGE] __attribute__((aligned(64)));
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
            case 1: mxfp4_rows16(bo, ld, so, lds, nr, pairs, stage, xj, half, 1, cols, kb, yj, ldy); break;
            case 2: mxfp4_rows16(bo, ld, so, lds, nr, pairs, stage, xj, half, 2, cols, kb, yj, ldy); break;
            case 3: mxfp4_rows16(bo, ld, so, lds, nr, pairs, stage, xj, half, 3, cols, kb, yj, ldy); break;
            default: mxfp4_rows16(bo, ld, so, lds, nr, pairs, stage, xj, half, 4, cols, kb, yj, ldy); break;
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
