/* MXFP4 products in the order torch sums ``x @ W`` for an ``[in, out]`` bfloat16 weight on an AVX2 CPU (GPT-OSS's
 * experts, as transformers holds them dequantized; services/worker/matvec.py, ``--matvec-kernel exact``; built into
 * one library with the other kernels by services/worker/dequant_kernel.py).
 *
 * Without oneDNN's bfloat16 kernels torch computes ``x @ W`` with ATen's plain gemm: for each output o, four partial
 * sums in float32, partial k taking the products x[i] * W[i][o] of the inputs i = k mod 4 in increasing order (the
 * last i % 4 inputs into partial 0), then ((p0 + p1) + p2) + p3. The product of two bfloat16 values is exact in
 * float32 unless it falls below 2^-126, so an FMA gives the same sums but where such a product's rounding (which
 * the FMA skips) would change a sum: a scale byte near 2 times tiny inputs, in principle; the start-up check
 * covers scale 2. Here W[i][o] is weight row o of an MXFP4 parameter stored ``[out, in]`` (``blocks`` [rows][in
 * / 32][16] bytes, row stride ld; ``scales`` [rows][in / 32] bytes, row stride lds), decoded in registers with the
 * dequantization's bits (a magnitude of the E2M1 table times 2^(scale - 127), exact for scale bytes 2..252, and the
 * code's sign). One 8-lane vector holds the four partial sums of two rows; per 4 inputs, the two rows' 16-byte
 * blocks (one in each 128-bit half) give their 4 codes each by one byte shuffle, and an FMA adds them in.
 * matvec_checks.check_exact compares it bit for bit with torch's ``x @ W`` on the dequantized weight before use. */
#include <stdint.h>
#include <string.h>

#include "matvec_common.h"
#include "parallel.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define XW_AVX2 1
#else
#define XW_AVX2 0
#endif
#define XW_PAIRS 4  /* pairs of rows side by side (8 accumulators with two rows of x) */
#define XW_X 2      /* rows of x per pass */

#if XW_AVX2

/* The 8 weights of inputs 4s..4s+3 of a row pair: ``both`` holds the pair's 16-byte blocks (row A low, row B high),
 * ``pick[s]`` the shuffle giving each lane its code's byte, ``shift``/``signs`` its nibble and sign bit, ``scale``
 * 2^(scale - 127) of each row (A's four lanes, then B's). */
static inline __m256 xw_weights(__m256i both, __m256i pick, __m256 mags, __m256 scale, __m256i shift,
                                __m256i signs) {
    __m256i b = _mm256_shuffle_epi8(both, pick);
    __m256 mag = _mm256_permutevar8x32_ps(mags, _mm256_srlv_epi32(b, shift));
    __m256i sign = _mm256_and_si256(_mm256_sllv_epi32(b, signs), _mm256_set1_epi32((int)0x80000000));
    return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(_mm256_mul_ps(mag, scale)), sign));
}

/* Rows [o, o + 2 * pairs) against rows [j, j + nx) of x (``xf``: float32, ``cols`` wide): y[j][o] as torch sums it.
 * Inlined with constant ``nx`` and ``pairs`` so that the accumulators stay in registers. */
static inline __attribute__((always_inline)) void xw_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales,
                                                          int64_t lds, const float *xf, const int nx, int64_t cols,
                                                          const int pairs, const __m256i *pick, float *y,
                                                          int64_t ldy) {
    const __m256 mags = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    const __m256i shift = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4), signs = _mm256_setr_epi32(28, 24, 28, 24, 28,
                                                                                                24, 28, 24);
    __m256 acc[XW_X][XW_PAIRS];
    for (int j = 0; j < nx; j++)
        for (int q = 0; q < pairs; q++) acc[j][q] = _mm256_setzero_ps();
    for (int64_t g = 0; g < cols / 32; g++) {
        const float *xg = xf + g * 32;
        for (int q = 0; q < pairs; q++) {
            const uint8_t *a = blocks + (2 * q) * ld + g * 16;
            __m256i both = _mm256_loadu2_m128i((const __m128i *)(a + ld), (const __m128i *)a);
            uint32_t ea = (uint32_t)scales[2 * q * lds + g] << 23, eb = (uint32_t)scales[(2 * q + 1) * lds + g] << 23;
            __m256 scale = _mm256_castsi256_ps(_mm256_setr_epi32((int)ea, (int)ea, (int)ea, (int)ea, (int)eb, (int)eb,
                                                                 (int)eb, (int)eb));
            for (int s = 0; s < 8; s++) {
                __m256 w = xw_weights(both, pick[s], mags, scale, shift, signs);
                for (int j = 0; j < nx; j++)
                    acc[j][q] = _mm256_fmadd_ps(_mm256_broadcast_ps((const __m128 *)(xg + j * cols + 4 * s)), w,
                                                acc[j][q]);
            }
        }
    }
    for (int j = 0; j < nx; j++)
        for (int q = 0; q < pairs; q++) {
            float p[8];
            _mm256_storeu_ps(p, acc[j][q]);
            y[j * ldy + 2 * q] = ((p[0] + p[1]) + p[2]) + p[3];
            y[j * ldy + 2 * q + 1] = ((p[4] + p[5]) + p[6]) + p[7];
        }
}

/* xw_rows with nx and pairs as constants. */
static void xw_rows_any(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds, const float *xf,
                        int nx, int64_t cols, int pairs, const __m256i *pick, float *y, int64_t ldy) {
#define XW_CASE(N, P) \
    if (nx == N && pairs == P) { xw_rows(blocks, ld, scales, lds, xf, N, cols, P, pick, y, ldy); return; }
    XW_CASE(1, 4) XW_CASE(2, 4) XW_CASE(1, 3) XW_CASE(2, 3) XW_CASE(1, 2) XW_CASE(2, 2) XW_CASE(1, 1) XW_CASE(2, 1)
#undef XW_CASE
}
#endif

/* y[j][o] = sum_i x[j][i] * W[i][o] for output rows [lo, hi) (see above). Returns 0; -1 without AVX2 and FMA, for
 * widths over 16384, a width that is no multiple of 32, an odd row range, or a scale byte outside 2..252 (the
 * caller dequantizes instead). */
MOEINF_HIDDEN int moeinf_mv_exact_xw_mxfp4_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                         const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y,
                                         int64_t ldy) {
#if XW_AVX2
    if (cols % 32 || cols > 16384 || (hi - lo) % 2)
        return -1;
    for (int64_t o = lo; o < hi; o++)
        for (int64_t g = 0; g < cols / 32; g++)
            if (scales[o * lds + g] < 2 || scales[o * lds + g] > 252)
                return -1;
    static __thread float xf[XW_X * 16384] __attribute__((aligned(32)));
    __m256i pick[8];
    for (int s = 0; s < 8; s++) {  /* lanes 0-3 (row A) and 4-7 (row B): bytes 2s, 2s, 2s + 1, 2s + 1 of the half */
        int8_t p[32];
        for (int lane = 0; lane < 8; lane++)
            for (int b = 0; b < 4; b++) p[4 * lane + b] = (int8_t)(b == 0 ? 2 * s + (lane & 3) / 2 : -1);
        memcpy(&pick[s], p, 32);
    }
    for (int64_t j0 = 0; j0 < m; j0 += XW_X) {
        int64_t nx = m - j0 < XW_X ? m - j0 : XW_X;
        for (int64_t i = 0; i < nx * cols; i++) xf[i] = bf16_f32(x[j0 * cols + i]);
        for (int64_t o = lo; o < hi; o += 2 * XW_PAIRS) {
            int pairs = (int)((hi - o) / 2 < XW_PAIRS ? (hi - o) / 2 : XW_PAIRS);
            xw_rows_any(blocks + o * ld, ld, scales + o * lds, lds, xf, (int)nx, cols, pairs, pick, y + j0 * ldy + o,
                        ldy);
        }
    }
    return 0;
#else
    (void)blocks; (void)ld; (void)scales; (void)lds; (void)x; (void)m; (void)cols; (void)lo; (void)hi; (void)y;
    (void)ldy;
    return -1;
#endif
}
