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
