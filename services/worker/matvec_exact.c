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

#include "parallel.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MVX_AVX2 1
#else
#define MVX_AVX2 0
#endif
#define MVX_ROWS 4  /* output rows summed side by side */

int moeinf_mv_exact_avx2(void) { return MVX_AVX2; }

#if MVX_AVX2
static void widen(const uint16_t *x, int64_t n, float *xf) {  /* n bfloat16 values into float32, exactly */
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)x[i] << 16;
        memcpy(xf + i, &bits, 4);
    }
}

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

#if MVX_AVX2
/* Block FP8 weights, decoded in registers into the bfloat16 values the dequantization writes (fp8_lookup.h's
 * fp8_f32_bf16(table[byte] * scale)), then summed as above. Within a block whose scale lies in 2^-100..2^100
 * (MVX_SANE), a byte S.EEEE.MMM with E >= 1 has the value 2^(E-7) * (1 + M/8) * scale, and both roundings (the
 * float32 product, then bfloat16) commute with the power of two: its bits are the block's rounded (1 + M/8) * scale
 * (``ref``: 8 entries, E = 7, less 7 in the exponent) with E added to the exponent and S as the sign, 8 values by
 * one byte shuffle, one permute, one shift, one mask and one add. Bytes with E = 0 (zero, subnormals) or NaN, and
 * blocks with other scales, take the table: a run of 32 bytes holding one is decoded by it into ``slow`` first. */
#define MVX_SANE(s) ((s) >= 0x1p-100f && (s) <= 0x1p100f)

/* 8 of the 16 bytes in both halves of ``bytes`` (``pick``: which) into their values: each 4-byte lane gets its byte
 * in all four places (the low 3 bits pick the entry of ``ref``, the top byte gives the sign and exponent). */
static inline __m256 fp8x8_exact(__m256i bytes, __m256i pick, __m256i ref, __m256i sign_exp_bits) {
    __m256i t = _mm256_shuffle_epi8(bytes, pick);
    __m256i sign_exp = _mm256_and_si256(_mm256_srai_epi32(t, 4), sign_exp_bits);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_permutevar8x32_epi32(ref, t), sign_exp));
}

#define MVX_PICK(a, b) _mm256_setr_epi8(a, a, a, a, a + 1, a + 1, a + 1, a + 1, a + 2, a + 2, a + 2, a + 2, a + 3, \
    a + 3, a + 3, a + 3, b, b, b, b, b + 1, b + 1, b + 1, b + 1, b + 2, b + 2, b + 2, b + 2, b + 3, b + 3, b + 3, b + 3)

/* No byte of the 32 at ``p`` has E = 0 or is NaN: none has (byte + 1) & 0x7F below 9 (``k``: 1, 0x7F, 8). */
static inline int fp8_plain32(const uint8_t *p, const __m256i *k) {
    __m256i u = _mm256_and_si256(_mm256_add_epi8(_mm256_loadu_si256((const __m256i *)p), k[0]), k[1]);
    return _mm256_movemask_epi8(_mm256_cmpgt_epi8(u, k[2])) == -1;
}

static inline uint16_t fp8_bf16_exact(float f) {  /* fp8_lookup.h's rounding */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One row block's 8-entry references (``refs``, per column block) and whether its scales allow them (``sane``). */
static void fp8_refs(const float *scales, const float *table, int64_t rb, int64_t grid_c, __m256i *refs,
                     uint8_t *sane) {
    for (int64_t cb = 0; cb < grid_c; cb++) {
        float s = scales[rb * grid_c + cb];
        uint32_t e[8];
        for (int k = 0; k < 8; k++) e[k] = ((uint32_t)fp8_bf16_exact(table[0x38 + k] * s) << 16) - (7u << 23);
        refs[cb] = _mm256_loadu_si256((const __m256i *)e);
        sane[cb] = MVX_SANE(s);
    }
}

/* 32 bytes at ``p`` by the table under scale ``s``, into bfloat16 ``out``. */
static __attribute__((noinline, cold)) void fp8x32_slow(const uint8_t *p, float s, const float *table, uint16_t *out) {
    for (int c = 0; c < 32; c++) out[c] = fp8_bf16_exact(table[p[c]] * s);
}

/* Half ``half`` of each 64-column block of x . row for ``nx`` rows of x (``x``, row stride ``cols``; inlined with
 * nx 1 or 2, so that each decoded vector serves both): accumulators 4 * half .. 4 * half + 3 of dot_exact's 8 per
 * row of x (``a[j]``), which are independent until blocks_sum adds them, so the halves run one after the other with
 * their accumulators kept in registers (with 8 per row and the decoding's registers, the compiler spills them). */
static inline __attribute__((always_inline)) void fp8_half_exact(const uint8_t *w, const __m256i *refs,
                                                                 const uint8_t *sane, const float *srow,
                                                                 const float *table, int64_t per_block,
                                                                 const float *x, const int nx, int64_t cols,
                                                                 int half, __m256 a[][8]) {
    __m256i lo = MVX_PICK(0, 4), hi = MVX_PICK(8, 12), se = _mm256_set1_epi32((int)0x87800000);
    __m256i k[3] = {_mm256_set1_epi8(1), _mm256_set1_epi8(0x7F), _mm256_set1_epi8(8)};
    __asm__("" : "+x"(se), "+x"(k[0]), "+x"(k[1]), "+x"(k[2]));  /* kept in registers, not rebuilt per block */
    __m256 acc[2][4];
    for (int j = 0; j < nx; j++)
        for (int q = 0; q < 4; q++) acc[j][q] = _mm256_setzero_ps();
    for (int64_t cb = 0, c0 = 0; c0 < cols; cb++, c0 += per_block) {
        __m256i ref = refs[cb];
        int fast = sane[cb];
        for (int64_t i = c0 + 32 * half; i < c0 + per_block; i += 64) {
            const uint8_t *p = w + i;
            __m256 wv[4];
            if (__builtin_expect(fast && fp8_plain32(p, k), 1)) {
                __m256i b0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
                __m256i b1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + 16)));
                wv[0] = fp8x8_exact(b0, lo, ref, se), wv[1] = fp8x8_exact(b0, hi, ref, se);
                wv[2] = fp8x8_exact(b1, lo, ref, se), wv[3] = fp8x8_exact(b1, hi, ref, se);
            } else {
                uint16_t slow[32];
                fp8x32_slow(p, srow[cb], table, slow);
                for (int q = 0; q < 4; q++) wv[q] = bf16x8_exact(slow + 8 * q);
            }
            for (int j = 0; j < nx; j++)
                for (int q = 0; q < 4; q++)
                    acc[j][q] = _mm256_fmadd_ps(_mm256_loadu_ps(x + j * cols + i + 8 * q), wv[q], acc[j][q]);
        }
    }
    for (int j = 0; j < nx; j++)
        for (int q = 0; q < 4; q++) a[j][4 * half + q] = acc[j][q];
}

/* y[j] = x[j] . row for an FP8 row (cols a multiple of 64, one scale per 64 columns), in the order of dot_exact:
 * two rows of x per pass, each decoded weight used for both. */
static void fp8_row_exact(const uint8_t *w, const __m256i *refs, const uint8_t *sane, const float *srow,
                          const float *table, int64_t per_block, const float *xf, int64_t m, int64_t cols,
                          float *y, int64_t ldy) {
    int64_t j = 0;
    for (; j + 2 <= m; j += 2) {
        __m256 a[2][8];
        for (int half = 0; half < 2; half++)
            fp8_half_exact(w, refs, sane, srow, table, per_block, xf + j * cols, 2, cols, half, a);
        y[j * ldy] = blocks_sum(a[0]);
        y[(j + 1) * ldy] = blocks_sum(a[1]);
    }
    if (j < m) {
        __m256 a[1][8];
        for (int half = 0; half < 2; half++)
            fp8_half_exact(w, refs, sane, srow, table, per_block, xf + j * cols, 1, cols, half, a);
        y[j * ldy] = blocks_sum(a[0]);
    }
}
#endif

#if MVX_AVX2
/* MXFP4 rows (``blocks`` [rows][cols / 32][16] bytes, 32 E2M1 codes each, low nibble first, under one E8M0 scale
 * byte) in the same order: 8 consecutive values of a row from 4 of its block's bytes, by one byte shuffle of the
 * block (each lane gets its code's byte), a shift to its nibble, a permute into the 8 E2M1 magnitudes, a product
 * with 2^(scale - 127) (exact for scale bytes 2..252: the dequantization's bfloat16 values) and the code's sign. */
#define MVX_MXPICK(s) _mm256_setr_epi8(4 * s, -1, -1, -1, 4 * s, -1, -1, -1, 4 * s + 1, -1, -1, -1, 4 * s + 1, -1, -1, \
    -1, 4 * s + 2, -1, -1, -1, 4 * s + 2, -1, -1, -1, 4 * s + 3, -1, -1, -1, 4 * s + 3, -1, -1, -1)

static inline __m256 mx8_exact(__m256i block, __m256i pick, __m256 scale, const __m256 *k) {
    __m256i b = _mm256_shuffle_epi8(block, pick);
    __m256 mag = _mm256_permutevar8x32_ps(k[0], _mm256_srlv_epi32(b, _mm256_castps_si256(k[1])));
    __m256i sign = _mm256_and_si256(_mm256_sllv_epi32(b, _mm256_castps_si256(k[2])), _mm256_castps_si256(k[3]));
    return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(_mm256_mul_ps(mag, scale)), sign));
}

/* Half ``half`` of each 64-column block of x . row (accumulators 4 * half .. + 3, as fp8_half_exact): the row's
 * MXFP4 block at column i. */
static void mx_half_exact(const uint8_t *blocks, const uint8_t *scales, const float *x, int64_t cols, int half,
                          __m256 *a) {
    __m256 k[4] = {_mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f),
                   _mm256_castsi256_ps(_mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)),
                   _mm256_castsi256_ps(_mm256_setr_epi32(28, 24, 28, 24, 28, 24, 28, 24)),
                   _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000))};
    __m256i p0 = MVX_MXPICK(0), p1 = MVX_MXPICK(1), p2 = MVX_MXPICK(2), p3 = MVX_MXPICK(3);
    __asm__("" : "+x"(k[0]), "+x"(k[1]), "+x"(k[2]), "+x"(k[3]));  /* kept in registers, not rebuilt per block */
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 32 * half; i < cols; i += 64) {
        __m256i block = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blocks + i / 2)));
        __m256 scale = _mm256_castsi256_ps(_mm256_set1_epi32((int)((uint32_t)scales[i / 32] << 23)));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), mx8_exact(block, p0, scale, k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), mx8_exact(block, p1, scale, k), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), mx8_exact(block, p2, scale, k), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), mx8_exact(block, p3, scale, k), a3);
    }
    a[4 * half] = a0, a[4 * half + 1] = a1, a[4 * half + 2] = a2, a[4 * half + 3] = a3;
}
#endif

/* y[j][o] = sum_i x[j][i] * W[o][i] for an MXFP4 weight stored [rows][in] (``blocks`` row stride ld bytes,
 * ``scales`` [rows][in / 32] row stride lds), each weight the dequantization's bfloat16 and each sum in ATen's
 * AVX2 dot order (moeinf_mv_exact_nt's). Returns 0; -1 without AVX2 and FMA or memory, for a width that is no
 * multiple of 64, or a scale byte outside 2..252 (the caller dequantizes instead). */
MOEINF_HIDDEN int moeinf_mv_exact_mxfp4_nt_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                         const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y,
                                         int64_t ldy) {
#if MVX_AVX2
    if (cols % 64)
        return -1;
    for (int64_t o = lo; o < hi; o++)
        for (int64_t g = 0; g < cols / 32; g++)
            if (scales[o * lds + g] < 2 || scales[o * lds + g] > 252)
                return -1;
    float *xf = malloc((size_t)(m * cols) * sizeof(float));
    if (xf == NULL)
        return -1;
    widen(x, m * cols, xf);
    for (int64_t o = lo; o < hi; o++)
        for (int64_t j = 0; j < m; j++) {
            __m256 a[8];
            for (int half = 0; half < 2; half++)
                mx_half_exact(blocks + o * ld, scales + o * lds, xf + j * cols, cols, half, a);
            y[j * ldy + o] = blocks_sum(a);
        }
    free(xf);
    return 0;
#else
    (void)blocks; (void)ld; (void)scales; (void)lds; (void)x; (void)m; (void)cols; (void)lo; (void)hi; (void)y;
    (void)ldy;
    return -1;
#endif
}

/* y[j][o] = sum_i x[j][i] * W[o][i] for a block-FP8 weight (``v`` [rows][ld] bytes under ``scales`` [rows /
 * block_r][cols / block_c] float32; ``table``: the 256 float32 values of the FP8 bytes), each weight the
 * dequantization's bfloat16 and each sum in ATen's AVX2 order (moeinf_mv_exact_nt's), output rows [lo, hi).
 * Returns 0; -1 without AVX2 and FMA or memory; -2 for a layout it does not take (cols and block_c multiples of
 * 64). */
MOEINF_HIDDEN int moeinf_mv_exact_fp8_nt_rows(const uint8_t *v, int64_t ld, const float *scales, const float *table,
                                       int64_t block_r, int64_t block_c, const uint16_t *x, int64_t m, int64_t cols,
                                       int64_t lo, int64_t hi, float *y, int64_t ldy) {
#if MVX_AVX2
    if (cols % 64 || block_c % 64 || block_r < 1)
        return -2;
    int64_t grid_c = cols / block_c;
    __m256i *refs = aligned_alloc(32, (size_t)grid_c * sizeof(__m256i));
    float *xf = malloc((size_t)(m * cols) * sizeof(float) + (size_t)grid_c);
    if (refs == NULL || xf == NULL) {
        free(refs);
        free(xf);
        return -1;
    }
    uint8_t *sane = (uint8_t *)(xf + m * cols);
    widen(x, m * cols, xf);
    int64_t rb = -1;
    for (int64_t o = lo; o < hi; o++) {
        if (o / block_r != rb)
            fp8_refs(scales, table, rb = o / block_r, grid_c, refs, sane);
        fp8_row_exact(v + o * ld, refs, sane, scales + rb * grid_c, table, block_c, xf, m, cols, y + o, ldy);
    }
    free(refs);
    free(xf);
    return 0;
#else
    (void)v; (void)ld; (void)scales; (void)table; (void)block_r; (void)block_c; (void)x; (void)m; (void)cols;
    (void)lo; (void)hi; (void)y; (void)ldy;
    return -1;
#endif
}

/* Returns 0, or -1 when this build has no AVX2 and FMA, or memory for x's float32 copy is lacking. */
MOEINF_HIDDEN int moeinf_mv_exact_nt_rows(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols,
                                   int64_t lo, int64_t hi, float *y, int64_t ldy) {
#if MVX_AVX2
    float *xf = malloc((size_t)(m * cols) * sizeof(float) + 32);
    if (xf == NULL)
        return -1;
    widen(x, m * cols, xf);
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
