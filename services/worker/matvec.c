/* bfloat16 matrix-vector products for decode steps (services/worker/matvec.py; built and loaded together with
 * dequant.c by services/worker/dequant_kernel.py).
 *
 * y[j][o] = sum_i x[j][i] * w[o * ld + i] for a few input rows x (j < m: the tokens routed to one expert), output
 * rows o in [lo, hi) (matvec_threads.c shares them among threads), float32 accumulation, float32 out; w is bfloat16
 * [out, in] (nn.Linear's and most checkpoints' experts), each row contiguous with row stride ld (elements). The weight
 * streams from memory once per call, straight from where it lies (a pool slot): no packing, no copy (each block of
 * 8 rows is read again from cache for every second row of x).
 * On CPUs with AVX-512 BF16 the kernel runs VDPBF16PS on 8 rows at once, prefetching the next 8 rows into L2 as
 * it goes (a block ahead: twice the speed of prefetching within the rows on short rows), and streams at the
 * memory's speed on one core; the rows left over take plain C (as would a CPU without it, which matvec.check
 * refuses). The sums are the same values as oneDNN's
 * but added in another order: the last bits of a product can differ (matvec.py's callers say so). VDPBF16PS reads
 * subnormal bfloat16 inputs as zero. */
#include <stdint.h>
#include <string.h>

#include "matvec_common.h"
#include "parallel.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MV_FAST 1
#define MV_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MV_FAST 1
#define MV_AVX2 1
#else
#define MV_FAST 0
#define MV_AVX2 0
#endif

#define MV_ROWS 8   /* output rows per pass: enough independent streams to keep the memory busy */

int moeinf_mv_fast(void) { return MV_FAST; }

/* One output row, any m, any width: the portable path and the tails. 16 partial sums the compiler vectorizes. */
static void row_plain(const uint16_t *w, const uint16_t *x, int64_t m, int64_t cols, float *y, int64_t ldy) {
    for (int64_t j = 0; j < m; j++) {
        float part[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= cols; i += 16)
            for (int k = 0; k < 16; k++) part[k] += bf16_f32(w[i + k]) * bf16_f32(x[j * cols + i + k]);
        float sum = 0;
        for (; i < cols; i++) sum += bf16_f32(w[i]) * bf16_f32(x[j * cols + i]);
        for (int k = 0; k < 16; k++) sum += part[k];
        y[j * ldy] = sum;
    }
}

#if MV_FAST && !MV_AVX2
/* MV_ROWS output rows against the m (1 or 2: at most 16 accumulators) input rows starting at x. */
static inline __attribute__((always_inline)) void rows_dp(const uint16_t *w, int64_t ld, const uint16_t *x,
                                                          int m, int64_t cols, float *y, int64_t ldy) {
    __m512 acc[2][MV_ROWS];
    for (int j = 0; j < m; j++)
        for (int r = 0; r < MV_ROWS; r++) acc[j][r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < cols; i += 32) {
        __mmask32 mask = cols - i >= 32 ? 0xffffffffu : (__mmask32)((1u << (cols - i)) - 1);
        __m512bh xv[2];
        for (int j = 0; j < m; j++) xv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + j * cols + i);
        for (int r = 0; r < MV_ROWS; r++) {
            const uint16_t *p = w + r * ld + i;
            _mm_prefetch((const char *)(p + MV_ROWS * ld), _MM_HINT_T1);  /* the next rows' same place, into L2 */
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
            for (int j = 0; j < m; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv, xv[j]);
        }
    }
    for (int j = 0; j < m; j++)
        for (int r = 0; r < MV_ROWS; r++) y[j * ldy + r] = _mm512_reduce_add_ps(acc[j][r]);
}
#endif

#if MV_AVX2
/* Without AVX-512 BF16 (AVX2 and FMA: Zen 2/3, Intel before Cooper Lake): each bfloat16 weight widened to float32
 * by a shift and multiplied by FMA, MV2_ROWS rows at once against m (1 or 2) input rows (8 accumulators of the 16
 * registers), 8 columns per pass, the rows two blocks ahead prefetched into L2 once per line (one block ahead: 15%
 * slower on 2048-wide rows); the last cols % 8 columns plainly.
 * oneDNN's bfloat16 product on these CPUs streams at about half the memory's speed; this one near it. Subnormal
 * weights are kept (as oneDNN keeps them here), unlike VDPBF16PS. */
#define MV2_ROWS 4

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __attribute__((always_inline)) void rows_fma(const uint16_t *w, int64_t ld, const uint16_t *x,
                                                           int m, int64_t cols, float *y, int64_t ldy) {
    __m256 acc[2][MV2_ROWS];
    for (int j = 0; j < m; j++)
        for (int r = 0; r < MV2_ROWS; r++) acc[j][r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8) {
        if (i % 32 == 0)  /* once per cache line of each row: the rows two blocks ahead, into L2 */
            for (int r = 0; r < MV2_ROWS; r++)
                _mm_prefetch((const char *)(w + (r + 2 * MV2_ROWS) * ld + i), _MM_HINT_T1);
        __m256 xv[2];
        for (int j = 0; j < m; j++) xv[j] = bf16x8(x + j * cols + i);
        for (int r = 0; r < MV2_ROWS; r++) {
            __m256 wv = bf16x8(w + r * ld + i);
            for (int j = 0; j < m; j++) acc[j][r] = _mm256_fmadd_ps(wv, xv[j], acc[j][r]);
        }
    }
    for (int j = 0; j < m; j++)
        for (int r = 0; r < MV2_ROWS; r++) {
            float sum = hsum8(acc[j][r]);
            for (int64_t c = i; c < cols; c++) sum += bf16_f32(w[r * ld + c]) * bf16_f32(x[j * cols + c]);
            y[j * ldy + r] = sum;
        }
}
#endif

MOEINF_HIDDEN void moeinf_mv_bf16_nt_rows(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols,
                                   int64_t lo, int64_t hi, float *y, int64_t ldy) {
    int64_t o = lo;
#if MV_AVX2
    for (; o + MV2_ROWS <= hi; o += MV2_ROWS) {
        const uint16_t *wr = w + o * ld;
        int64_t j = 0;
        for (; j + 2 <= m; j += 2) rows_fma(wr, ld, x + j * cols, 2, cols, y + j * ldy + o, ldy);
        if (j < m) rows_fma(wr, ld, x + j * cols, 1, cols, y + j * ldy + o, ldy);
    }
#elif MV_FAST
    for (; o + MV_ROWS <= hi; o += MV_ROWS) {
        const uint16_t *wr = w + o * ld;
        int64_t j = 0;
        for (; j + 2 <= m; j += 2) rows_dp(wr, ld, x + j * cols, 2, cols, y + j * ldy + o, ldy);
        if (j < m) rows_dp(wr, ld, x + j * cols, 1, cols, y + j * ldy + o, ldy);
    }
#endif
    for (; o < hi; o++) row_plain(w + o * ld, x, m, cols, y + o, ldy);
}

/* Block-FP8 matrix-vector products: the weight's bytes are looked up into bfloat16 in registers (AVX-512 VBMI byte
 * shuffles, the same tables as dequant.c's) and multiplied there, so a decode step reads each routed expert's FP8
 * bytes once and writes nothing: y[j][o] = sum_i x[j][i] * bf16(fp8(v[o][i]) * scale[o / block_r][i / block_c]),
 * the bf16 rounding the dequantization path's (round to nearest even, torch's NaN). */
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MV8_FAST 1
#define MV8_AVX2 0
#elif MV_AVX2
#define MV8_FAST 1
#define MV8_AVX2 1
#else
#define MV8_FAST 0
#define MV8_AVX2 0
#endif

int moeinf_mv_fp8_fast(void) { return MV8_FAST; }

#include "fp8_lookup.h"

#if MV8_FAST && !MV8_AVX2
#define MV8_ROWS 8
/* Returns 0, or -1 when the layout is not one it takes (the caller then dequantizes and multiplies). x: [m][cols]
 * bfloat16; table: the 256 float32 values of the FP8 bytes; scales: [grid_r][cols / block_c] float32. */
MOEINF_HIDDEN int moeinf_mv_fp8_nt_rows(const uint8_t *v, int64_t ld, const float *scales, const float *table,
                                 int64_t block_r, int64_t block_c, const uint16_t *x, int64_t m, int64_t cols,
                                 int64_t lo, int64_t hi, float *y, int64_t ldy) {
    if (block_c <= 0 || block_r <= 0)
        return -1;
    int64_t grid_c = cols / block_c;
    if (cols % 64 || block_c % 64 || cols % block_c || grid_c > 64 || block_r % MV8_ROWS || lo % MV8_ROWS
        || m > 4 || cols > 16384)
        return -1;
    static __thread uint8_t planes[64][2][256] __attribute__((aligned(64)));
    static __thread uint16_t xp[4][16384] __attribute__((aligned(64)));
    /* x in the order the lookups leave the values in: per 64 columns, unpacklo's (0-7, 16-23, 32-39, 48-55) then
     * unpackhi's (8-15, 24-31, 40-47, 56-63) */
    for (int64_t j = 0; j < m; j++)
        for (int64_t c = 0; c < cols; c += 64)
            for (int k = 0; k < 4; k++) {
                memcpy(xp[j] + c + 8 * k, x + j * cols + c + 16 * k, 16);
                memcpy(xp[j] + c + 32 + 8 * k, x + j * cols + c + 16 * k + 8, 16);
            }
    int64_t planes_of = -1;
    for (int64_t o = lo; o < hi; o += MV8_ROWS) {
        int64_t nr = hi - o < MV8_ROWS ? hi - o : MV8_ROWS;
        if (o / block_r != planes_of) {
            planes_of = o / block_r;
            fp8_block_planes(planes, scales, table, planes_of, grid_c);
        }
        for (int64_t j = 0; j < m; j++) {
            __m512 acc[MV8_ROWS];
            for (int r = 0; r < MV8_ROWS; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t cb = 0; cb < grid_c; cb++) {
                __m512i pl[4], ph[4];
                for (int k = 0; k < 4; k++) {
                    pl[k] = _mm512_load_si512(planes[cb][0] + 64 * k);
                    ph[k] = _mm512_load_si512(planes[cb][1] + 64 * k);
                }
                for (int64_t c = cb * block_c; c < (cb + 1) * block_c; c += 64) {
                    __m512bh xa = (__m512bh)_mm512_load_si512(xp[j] + c);
                    __m512bh xb = (__m512bh)_mm512_load_si512(xp[j] + c + 32);
                    for (int r = 0; r < nr; r++) {
                        const uint8_t *p = v + (o + r) * ld + c;
                        _mm_prefetch((const char *)(p + MV8_ROWS * ld), _MM_HINT_T1);  /* next rows, into L2 */
                        __m512i l, h;
                        fp8_lookup_planes(_mm512_loadu_si512(p), pl, ph, &l, &h);
                        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_unpacklo_epi8(l, h), xa);
                        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_unpackhi_epi8(l, h), xb);
                    }
                }
            }
            for (int r = 0; r < nr; r++) y[j * ldy + o + r] = _mm512_reduce_add_ps(acc[r]);
        }
    }
    return 0;
}
#elif MV8_AVX2
/* AVX2 and FMA: each FP8 byte's float32 value (its bits moved into place and scaled by 2^120, as dequant.c computes
 * it), times its block's scale, rounded to bfloat16 (the dequantization's bits: nearest even, NaN bytes NaN) and
 * kept as float32, then FMA. MV8_ROWS rows at a time, each input row in turn; the rows two blocks ahead prefetched
 * into L2. About 2 vector operations per weight: compute-bound near 4 G weights/s, but nothing is written. */
#define MV8_ROWS 4

static inline __m256 fp8x8_weights(const uint8_t *p, __m256 scale) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i bits = _mm256_and_si256(_mm256_srai_epi32(_mm256_slli_epi32(b, 24), 4), _mm256_set1_epi32((int)0x87F00000));
    __m256i nan = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)), _mm256_set1_epi32(0x7F));
    bits = _mm256_or_si256(bits, _mm256_and_si256(nan, _mm256_set1_epi32(0x7FC00000)));  /* S.1111.111: NaN */
    __m256i vb = _mm256_castps_si256(_mm256_mul_ps(_mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f)),
                                                   scale));
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(vb, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(vb, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    __m256i keep = _mm256_castps_si256(_mm256_cmp_ps(_mm256_castsi256_ps(vb), _mm256_castsi256_ps(vb), _CMP_ORD_Q));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(vb, _mm256_and_si256(r, _mm256_set1_epi32((int)0xFFFF0000)), keep));
}

MOEINF_HIDDEN int moeinf_mv_fp8_nt_rows(const uint8_t *v, int64_t ld, const float *scales, const float *table,
                                 int64_t block_r, int64_t block_c, const uint16_t *x, int64_t m, int64_t cols,
                                 int64_t lo, int64_t hi, float *y, int64_t ldy) {
    (void)table;  /* the values are computed: dequant.c's AVX2 arithmetic, checked against the table by matvec.py */
    if (block_c <= 0 || block_r <= 0 || block_c % 32 || cols % block_c || m > 4)
        return -1;
    int64_t grid_c = cols / block_c;
    unsigned csr = _mm_getcsr();
    _mm_setcsr(csr & ~0x40u);  /* DAZ off: a subnormal E4M3 value is a float32 subnormal before its 2^120 */
    for (int64_t o = lo; o < hi; o += MV8_ROWS) {
        int64_t nr = hi - o < MV8_ROWS ? hi - o : MV8_ROWS;
        for (int64_t j = 0; j < m; j++) {
            __m256 acc[MV8_ROWS];
            for (int r = 0; r < MV8_ROWS; r++) acc[r] = _mm256_setzero_ps();
            for (int64_t cb = 0; cb < grid_c; cb++) {
                __m256 sc[MV8_ROWS];
                for (int r = 0; r < nr; r++) sc[r] = _mm256_set1_ps(scales[((o + r) / block_r) * grid_c + cb]);
                for (int64_t c = cb * block_c; c < (cb + 1) * block_c; c += 32) {
                    for (int r = 0; r < nr; r++)
                        _mm_prefetch((const char *)(v + (o + r + 2 * MV8_ROWS) * ld + c), _MM_HINT_T1);
                    for (int k = 0; k < 32; k += 8) {
                        __m256 xv = bf16x8(x + j * cols + c + k);
                        for (int r = 0; r < nr; r++)
                            acc[r] = _mm256_fmadd_ps(fp8x8_weights(v + (o + r) * ld + c + k, sc[r]), xv, acc[r]);
                    }
                }
            }
            for (int r = 0; r < nr; r++) y[j * ldy + o + r] = hsum8(acc[r]);
        }
    }
    _mm_setcsr(csr);
    return 0;
}
#else
MOEINF_HIDDEN int moeinf_mv_fp8_nt_rows(const uint8_t *v, int64_t ld, const float *scales, const float *table,
                                 int64_t block_r, int64_t block_c, const uint16_t *x, int64_t m, int64_t cols,
                                 int64_t lo, int64_t hi, float *y, int64_t ldy) {
    return -1;
}
#endif
