/* bfloat16 matrix-vector products with torch's own bits (services/worker/matvec.py, ``--matvec-kernel exact``;
 * built into one library with dequant.c and matvec.c by services/worker/dequant_kernel.py).
 *
 * y[j][o] = sum_i x[j][i] * w[o * ld + i], float32 out, for output rows o in [lo, hi) and a few input rows x (j <
 * m): each sum computed in the order torch's CPU bfloat16 matrix product uses on an AVX2 build (ATen's
 * dot-with-float32-arithmetic over vectors of 8 floats: 8 accumulators of 8 lanes over blocks of 64 columns, each
 * an FMA; the accumulators added as a tree (a[i] += a[i + 4], then + 2, then + 1); the lanes reduced by the same
 * three shuffles; then 16-column blocks into one more accumulator, low 8 then high 8, reduced alike and added; then
 * the last columns one product at a time). Rounded to bfloat16 by the caller, the result is the product torch
 * returns, bit for bit: matvec.check_exact compares the two on this machine before the kernel is used, and a
 * torch whose order differs (another CPU capability, another version) fails that check and keeps its own path.
 * It reads the weight once, in place (a pool slot), 4 rows side by side, at ~1.8x the speed of torch's own call on
 * this path (which widens x again for every output row and reads one row at a time). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MVX_AVX2 1
#else
#define MVX_AVX2 0
#endif
#define MVX_ROWS 4  /* output rows summed side by side */

int moeinf_mv_exact_avx2(void) { return MVX_AVX2; }

#if MVX_AVX2
static inline __m256 bf16x8_exact(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float lanes_sum(__m256 v) {  /* ATen's vec_reduce_all for 8 floats on AVX2 */
    v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 1));
    v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
    v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
    return _mm256_cvtss_f32(v);
}

/* The sum's tails after its blocks of 64 (``sum``: their reduction): 16-column blocks into one accumulator, low 8
 * then high 8, reduced and added; then one product at a time. */
static float tails_exact(float sum, const uint16_t *w, const float *x, int64_t i, int64_t cols) {
    __m256 tail = _mm256_setzero_ps();
    for (int64_t vec = cols & ~(int64_t)15; i < vec; i += 8)
        tail = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), bf16x8_exact(w + i), tail);
    sum += lanes_sum(tail);
    for (; i < cols; i++) {
        uint32_t bits = (uint32_t)w[i] << 16;
        float wi;
        memcpy(&wi, &bits, 4);
        sum += x[i] * wi;
    }
    return sum;
}

/* The accumulators' tree (a[k] += a[k + 4], + 2, + 1) and the lanes' sum: the blocks' part of one output. */
static inline float blocks_sum(__m256 *a) {
    for (int half = 4; half >= 1; half /= 2)
        for (int k = 0; k < half; k++) a[k] = _mm256_add_ps(a[k], a[k + half]);
    return lanes_sum(a[0]);
}

/* MVX_ROWS output rows against one input row, each with its own 8 accumulators (the compiler keeps what fits in
 * registers): several streams from memory at once, ~10-20% faster than a row at a time; the rows two passes ahead
 * prefetched into L2. */
static void rows_exact(const uint16_t *w, int64_t ld, const float *x, int64_t cols, float *y, int prefetch) {
    __m256 a[MVX_ROWS][8];
    for (int r = 0; r < MVX_ROWS; r++)
        for (int k = 0; k < 8; k++) a[r][k] = _mm256_setzero_ps();
    int64_t blocks = cols & ~(int64_t)63;
    for (int64_t i = 0; i < blocks; i += 64) {
        if (prefetch)
            for (int r = 0; r < MVX_ROWS; r++) {
                _mm_prefetch((const char *)(w + (r + 2 * MVX_ROWS) * ld + i), _MM_HINT_T1);
                _mm_prefetch((const char *)(w + (r + 2 * MVX_ROWS) * ld + i + 32), _MM_HINT_T1);
            }
        for (int k = 0; k < 8; k++) {
            __m256 xv = _mm256_loadu_ps(x + i + 8 * k);
            for (int r = 0; r < MVX_ROWS; r++)
                a[r][k] = _mm256_fmadd_ps(xv, bf16x8_exact(w + r * ld + i + 8 * k), a[r][k]);
        }
    }
    for (int r = 0; r < MVX_ROWS; r++)
        y[r] = tails_exact(blocks_sum(a[r]), w + r * ld, x, blocks, cols);
}

static float dot_exact(const uint16_t *w, const float *x, int64_t cols) {
    __m256 a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
    int64_t blocks = cols & ~(int64_t)63;
    for (int64_t i = 0; i < blocks; i += 64)
        for (int k = 0; k < 8; k++)
            a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * k), bf16x8_exact(w + i + 8 * k), a[k]);
    return tails_exact(blocks_sum(a), w, x, blocks, cols);
}
#endif

/* Returns 0, or -1 when this build has no AVX2 and FMA, or memory for x's float32 copy is lacking. */
int moeinf_mv_exact_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                       int64_t hi, float *y, int64_t ldy) {
#if MVX_AVX2
    float *xf = malloc((size_t)(m * cols) * sizeof(float) + 32);
    if (xf == NULL)
        return -1;
    for (int64_t i = 0; i < m * cols; i++) {
        uint32_t bits = (uint32_t)x[i] << 16;
        memcpy(xf + i, &bits, 4);
    }
    int64_t o = lo;
    for (; o + MVX_ROWS <= hi; o += MVX_ROWS)
        for (int64_t j = 0; j < m; j++)
            rows_exact(w + o * ld, ld, xf + j * cols, cols, y + j * ldy + o, j == 0 && o + 3 * MVX_ROWS <= hi);
    for (; o < hi; o++)
        for (int64_t j = 0; j < m; j++) y[j * ldy + o] = dot_exact(w + o * ld, xf + j * cols, cols);
    free(xf);
    return 0;
#else
    (void)w; (void)ld; (void)x; (void)m; (void)cols; (void)lo; (void)hi; (void)y; (void)ldy;
    return -1;
#endif
}

/* The same products in the order oneDNN's brgemm matmul sums them on an AVX-512 BF16 CPU (torch's bfloat16 linears
 * and grouped matmul there): each output column is one lane; the input columns are taken in pairs, in order, each
 * pair by one vdpbf16ps (the odd column's product added first, then the even one's, float32 rounding after each),
 * in blocks of ``kb`` columns that each start from zero, the blocks' sums added in order. ``kb`` is what the
 * caller found oneDNN to use for this many input rows (matvec.exact_blocks); matvec.check_exact compares the
 * products with torch's, bit for bit, for each shape before use. 16 output rows at a time: their next 16 column
 * pairs loaded as 16 rows of 16 dwords and transposed in registers, so that one vector holds one pair of all 16. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MVO_AVX512 1
#else
#define MVO_AVX512 0
#endif

int moeinf_mv_exact_onednn(void) { return MVO_AVX512; }

#if MVO_AVX512
#ifndef MVO_PREFETCH
#define MVO_PREFETCH(p) (void)(p)  /* the hardware prefetcher does better than explicit hints here */
#endif
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

/* Rows [o, o + 16) (``nr`` of them real: the others repeat the last and are not stored) against ``nj`` <= 4 input
 * rows, their column pairs in ``xp`` (row stride ``half``, zero past the columns: a chunk's padding adds zeros).
 * Inlined for each nj, the 16 pairs of a chunk unrolled: the transposed vectors stay in registers. */
static inline __attribute__((always_inline)) void rows16_onednn(const uint16_t *w, int64_t ld, int nr,
                                                                const uint32_t *xp, int64_t half, const int nj,
                                                                int64_t cols, int64_t kb, float *y, int64_t ldy) {
    const uint16_t *row[16];
    for (int i = 0; i < 16; i++) row[i] = w + (i < nr ? i : nr - 1) * ld;
    __m512 total[4], acc[4];
    for (int j = 0; j < 4; j++) total[j] = acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols; b += kb) {
        int64_t e = b + kb < cols ? b + kb : cols;
        for (int j = 0; j < nj; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t c = b; c < e; c += 32) {
            __mmask32 mask = e - c >= 32 ? 0xFFFFFFFFu : (1u << (e - c)) - 1;
            __m512i r[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) {
                MVO_PREFETCH(row[i] + c);
                r[i] = _mm512_maskz_loadu_epi16(mask, row[i] + c);
            }
            transpose16(r);
#pragma GCC unroll 16
            for (int p = 0; p < 16; p++)
#pragma GCC unroll 4
                for (int j = 0; j < nj; j++)
                    acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)r[p],
                                              (__m512bh)_mm512_set1_epi32((int)xp[j * half + c / 2 + p]));
        }
        for (int j = 0; j < nj; j++) total[j] = b == 0 ? acc[j] : _mm512_add_ps(total[j], acc[j]);
    }
    __mmask16 out = nr == 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    for (int j = 0; j < nj; j++) _mm512_mask_storeu_ps(y + j * ldy, out, total[j]);
}
#endif

/* Returns 0, or -1 when this build has no AVX-512 BF16 or the shape is not one it takes (cols odd, kb not a
 * multiple of 32). */
int moeinf_mv_onednn_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                        int64_t hi, float *y, int64_t ldy, int64_t kb) {
#if MVO_AVX512
    if (cols % 2 || kb <= 0 || kb % 32)
        return -1;
    int64_t half = cols / 2 + 16;  /* each input row's pairs, then a chunk of zeros */
    uint32_t *xp = calloc((size_t)(m * half), sizeof(uint32_t));
    if (xp == NULL)
        return -1;
    for (int64_t j = 0; j < m; j++) memcpy(xp + j * half, x + j * cols, (size_t)cols * 2);
    for (int64_t o = lo; o < hi; o += 16) {
        int nr = hi - o < 16 ? (int)(hi - o) : 16;
        for (int64_t j = 0; j < m; j += 4) {
            const uint32_t *xj = xp + j * half;
            float *yj = y + j * ldy + o;
            switch (m - j < 4 ? (int)(m - j) : 4) {
            case 1: rows16_onednn(w + o * ld, ld, nr, xj, half, 1, cols, kb, yj, ldy); break;
            case 2: rows16_onednn(w + o * ld, ld, nr, xj, half, 2, cols, kb, yj, ldy); break;
            case 3: rows16_onednn(w + o * ld, ld, nr, xj, half, 3, cols, kb, yj, ldy); break;
            default: rows16_onednn(w + o * ld, ld, nr, xj, half, 4, cols, kb, yj, ldy); break;
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
