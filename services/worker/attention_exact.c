/* Decode attention on the CPU with torch's own bits (services/worker/decode_attention.py, ``--attention-kernel
 * exact``; built into one library with the other kernels by services/worker/dequant_kernel.py).
 *
 * What sdpa computes for one query per head on a bfloat16 CPU tensor (ATen's flash kernel, AVX-512 build, MKL's
 * bfloat16 products): per head, in blocks of 512 cached tokens,
 *   - each score a dot product in MKL's transposed matrix-vector order (four partial sums over the head's columns,
 *     column i into sum i % 4; then (s0 + s2) + (s1 + s3); the last d % 4 columns added one by one), times the scale;
 *   - the block's maximum; e^(score - maximum) by ATen's fast vector exponential (``fexp_u20``: 2^x from a cubic in
 *     the fraction of x log2(e), put together in the float's bits) for whole vectors of 16 scores, by e^x in double
 *     for the last n % 16; summed as ATen's loop adds them (vectors 32k..32k+15 and 32k+16..32k+31 into two sums,
 *     a last lone vector into a third, (first + third) + second, the 16 lanes folded in halves, then the rest one by
 *     one); each weight rounded to bfloat16;
 *   - a later block rescales the running sum (one fused multiply-add) and the output by e^(old max - new max);
 *   - the output, per column, the weights times the values in MKL's plain matrix-vector order (tokens in groups of
 *     four, (w0 v0 + w2 v2) + (w1 v1 + w3 v3) added to the column; then the last n % 4 tokens from the last back);
 *   - each column times 1 / the sum, rounded to bfloat16.
 * torch calls a general matrix product per head for this (~0.1 ms a layer at 32 cached tokens here, ~0.9 ms at
 * 256: MKL takes its generic code on this CPU); the kernel reads each key and value once for every query head that
 * shares it. Every product of two bfloat16 values is exact in float32, so only the order of the additions matters,
 * and that is torch's: decode_attention.check_exact compares the two bit for bit before use, and a torch, MKL or
 * CPU with another order fails that check and keeps torch's attention.
 * Returns 0, or -1 when its buffers cannot be allocated. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE4_1__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "matvec_common.h"  /* bf16_f32, f32_bf16 (a NaN to 0xffff, as ATen's vectors) */
#include "parallel.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(__GNUC__) && !defined(__clang__) && !defined(__AVX512F__)
#pragma GCC diagnostic ignored "-Wpsabi"  /* (64-byte vectors in static functions only) */
#endif

#define SPLIT 512  /* tokens per block (ATen's kvSplitSize) */
#define LANES 16   /* ATen's float vector on AVX-512 */

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ATen's fexp_u20 for one value (the vector code's steps, lane by lane). */
static inline float fexp_u20(float x) {
    if (x != x) return bits_f32(0x80000000u);  /* (the truncating conversion of a NaN) */
    if (x < bits_f32(0xc2aeac50u)) return 0.0f;
    if (x > bits_f32(0x42b17218u)) return bits_f32(0x7f800000u);
    float s = x * bits_f32(0x3fb8aa3bu);  /* x log2(e) */
    float frac = s - floorf(s);
    float r = fmaf(frac, bits_f32(0xbda235d5u), bits_f32(0xbe65b8f5u));
    r = fmaf(frac, r, bits_f32(0x3e9b69f0u));
    r = fmaf(frac, r, bits_f32(0x38e077a1u));
    s = s - r;
    float t = fmaf(8388608.0f, s, 1065353216.0f);  /* 2^23 s + 127 2^23: the float's bits, as an integer */
    return bits_f32((uint32_t)(int32_t)t);
}

typedef float f4 __attribute__((vector_size(16)));
typedef uint32_t u4 __attribute__((vector_size(16)));
typedef uint16_t h4 __attribute__((vector_size(8)));

static inline f4 widen4(const uint16_t *p) {  /* four bfloat16 values into float32, exactly */
#if defined(__SSE4_1__)
    return (f4)_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)p)), 16);
#else
    h4 h;
    memcpy(&h, p, 8);
    u4 u = __builtin_convertvector(h, u4) << 16;
    f4 f;
    memcpy(&f, &u, 16);
    return f;
#endif
}

static inline f4 load4(const float *p) {
    f4 f;
    memcpy(&f, p, 16);
    return f;
}

/* The scores of query row qf (float) with KEYS key rows from k (token stride kts), d columns, in MKL's transposed
 * order: lane l of a key's partial sums holds its columns l, l + 4, ... (the keys side by side, for the FMA units). */
#define KEYS 8  /* keys side by side */
static void scores8(const float *qf, const uint16_t *k, int64_t kts, int64_t d, float scale, float *out) {
    f4 part[KEYS] = {0};
    int64_t d4 = d - d % 4;
    for (int64_t i = 0; i < d4; i += 4) {
        f4 qv = load4(qf + i);
        for (int j = 0; j < KEYS; j++) part[j] += qv * widen4(k + j * kts + i);
    }
    for (int j = 0; j < KEYS; j++) {
        float sum = (part[j][0] + part[j][2]) + (part[j][1] + part[j][3]);
        for (int64_t i = d4; i < d; i++) sum += qf[i] * bf16_f32(k[j * kts + i]);
        out[j] = sum * scale;
    }
}

static float score(const float *qf, const uint16_t *k, int64_t d) {  /* one key, the same order */
    f4 part = {0};
    int64_t d4 = d - d % 4;
    for (int64_t i = 0; i < d4; i += 4) part += load4(qf + i) * widen4(k + i);
    float sum = (part[0] + part[2]) + (part[1] + part[3]);
    for (int64_t i = d4; i < d; i++) sum += qf[i] * bf16_f32(k[i]);
    return sum;
}

#if defined(__AVX512F__)
/* fexp_u20 of sc[0..16) - m, as ATen's vector code computes it: added into *acc, the weights rounded to bfloat16
 * (as floats) into w[0..16). */
static inline void exp16(const float *sc, float m, float *w, __m512 *acc) {
    __m512 x = _mm512_sub_ps(_mm512_loadu_ps(sc), _mm512_set1_ps(m));
    __mmask16 low = _mm512_cmp_ps_mask(x, _mm512_set1_ps(bits_f32(0xc2aeac50u)), _CMP_LT_OS);
    __mmask16 high = _mm512_cmp_ps_mask(x, _mm512_set1_ps(bits_f32(0x42b17218u)), _CMP_GT_OS);
    __m512 s = _mm512_mul_ps(x, _mm512_set1_ps(bits_f32(0x3fb8aa3bu)));
    __m512 frac = _mm512_sub_ps(s, _mm512_roundscale_ps(s, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    __m512 r = _mm512_fmadd_ps(frac, _mm512_set1_ps(bits_f32(0xbda235d5u)), _mm512_set1_ps(bits_f32(0xbe65b8f5u)));
    r = _mm512_fmadd_ps(frac, r, _mm512_set1_ps(bits_f32(0x3e9b69f0u)));
    r = _mm512_fmadd_ps(frac, r, _mm512_set1_ps(bits_f32(0x38e077a1u)));
    s = _mm512_sub_ps(s, r);
    __m512i e = _mm512_cvttps_epi32(_mm512_fmadd_ps(s, _mm512_set1_ps(8388608.0f), _mm512_set1_ps(1065353216.0f)));
    e = _mm512_mask_mov_epi32(e, low, _mm512_setzero_si512());
    e = _mm512_mask_mov_epi32(e, high, _mm512_set1_epi32(0x7f800000));
    *acc = _mm512_add_ps(*acc, _mm512_castsi512_ps(e));
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(e, 16), _mm512_set1_epi32(1));  /* to nearest, ties to even */
    __m512i rounded = _mm512_slli_epi32(_mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(e, odd),
                                                                           _mm512_set1_epi32(0x7fff)), 16), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(_mm512_castsi512_ps(e), _mm512_castsi512_ps(e), _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32((int)0xffff0000u));
    _mm512_storeu_ps(w, _mm512_castsi512_ps(rounded));
}
#endif

/* Scores sc[0..n) (already scaled, m their maximum) into weights w (bfloat16 values, as floats), returning their
 * sum in ATen's order. */
static float weigh(float *sc, int64_t n, float m, float *w) {
    float first[LANES] = {0}, second[LANES] = {0}, lone[LANES] = {0};
    int64_t whole = n - n % LANES, pairs = n - n % (2 * LANES), t = 0;
#if defined(__AVX512F__)
    __m512 va = _mm512_setzero_ps(), vb = _mm512_setzero_ps(), vc = _mm512_setzero_ps();
    for (; t < pairs; t += 2 * LANES) {
        exp16(sc + t, m, w + t, &va);
        exp16(sc + t + LANES, m, w + t + LANES, &vb);
    }
    if (t < whole) {
        exp16(sc + t, m, w + t, &vc);
        t += LANES;
    }
    _mm512_storeu_ps(first, va);
    _mm512_storeu_ps(second, vb);
    _mm512_storeu_ps(lone, vc);
#endif
    for (; t < pairs; t += 2 * LANES)
        for (int l = 0; l < LANES; l++) {
            float a = fexp_u20(sc[t + l] - m), b = fexp_u20(sc[t + LANES + l] - m);
            first[l] += a;
            second[l] += b;
            w[t + l] = bf16_f32(f32_bf16(a));
            w[t + LANES + l] = bf16_f32(f32_bf16(b));
        }
    for (; t < whole; t += LANES)
        for (int l = 0; l < LANES; l++) {
            float a = fexp_u20(sc[t + l] - m);
            lone[l] += a;
            w[t + l] = bf16_f32(f32_bf16(a));
        }
    for (int l = 0; l < LANES; l++) first[l] = (first[l] + lone[l]) + second[l];
    for (int half = LANES / 2; half >= 1; half /= 2)
        for (int l = 0; l < half; l++) first[l] = first[l] + first[l + half];
    float sum = first[0];
    for (; t < n; t++) {
        float e = (float)exp((double)(sc[t] - m));
        sum += e;
        w[t] = bf16_f32(f32_bf16(e));
    }
    return sum;
}

typedef float f16v __attribute__((vector_size(64)));

static inline f16v widen4x4(const uint16_t *p) {  /* four bfloat16 values into float32, four times over */
#if defined(__AVX512F__)
    int64_t bits;
    memcpy(&bits, p, 8);
    return (f16v)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_set1_epi64x(bits)), 16));
#else
    f4 kv = widen4(p);
    return __builtin_shufflevector(kv, kv, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
#endif
}

/* The scores of four query heads at once (qi: their rows interleaved, four columns of each head in turn) with n
 * key rows (n a multiple of KEYS): lanes 4h..4h+3 of a key's partial sums are head h's (the key's four columns
 * widened once for all four heads). Into sc[h * SPLIT + t]; the last d % 4 columns from qf (the heads' rows). */
static void scores_4h(const float *qi, const float *qf, const uint16_t *k, int64_t kts, int64_t n, int64_t d,
                      float scale, float *sc) {
    int64_t d4 = d - d % 4;
    for (int64_t t = 0; t < n; t += KEYS) {
        f16v part[KEYS] = {0};
        for (int64_t i = 0; i < d4; i += 4) {
            f16v qv;
            memcpy(&qv, qi + i * 4, 64);
            for (int j = 0; j < KEYS; j++) part[j] += qv * widen4x4(k + (t + j) * kts + i);
        }
        for (int j = 0; j < KEYS; j++)
            for (int h = 0; h < 4; h++) {
                float sum = (part[j][4 * h] + part[j][4 * h + 2]) + (part[j][4 * h + 1] + part[j][4 * h + 3]);
                for (int64_t i = d4; i < d; i++) sum += qf[h * d + i] * bf16_f32(k[(t + j) * kts + i]);
                sc[h * SPLIT + t + j] = sum * scale;
            }
    }
}

/* The scores of a key-value head's rep query heads (qf: their rows; qi: the same interleaved by four heads where
 * rep is a multiple of four) with n key rows, into sc[r * SPLIT + t]. */
static void scores(const float *qf, const float *qi, int64_t rep, const uint16_t *k, int64_t kts, int64_t n,
                   int64_t d, float scale, float *sc) {
    int64_t t0 = 0;
    if (rep % 4 == 0) {
        t0 = n - n % KEYS;
        for (int64_t r = 0; r < rep; r += 4)
            scores_4h(qi + r * d, qf + r * d, k, kts, t0, d, scale, sc + r * SPLIT);
    }
    for (int64_t r = 0; r < rep; r++) {
        int64_t t = t0;
        if (t0 == 0)
            for (; t + KEYS <= n; t += KEYS) scores8(qf + r * d, k + t * kts, kts, d, scale, sc + r * SPLIT + t);
        for (; t < n; t++) sc[r * SPLIT + t] = score(qf + r * d, k + t * kts, d) * scale;
    }
}

/* acc[r][0..d) += head r's weights w[r * SPLIT + t] times value rows v (token stride vts), n tokens, in MKL's
 * plain order; each value row widened once for all rep heads. */
#if defined(__AVX512F__)
static inline __m512 widen16(const uint16_t *p) {  /* sixteen bfloat16 values into float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* gather's sums for columns [c, c + 16) of up to four heads [h0, h0 + heads): the heads' sums held in registers
 * over all n tokens (the same additions, in the same order, as the loop below). */
static void gather16(float *acc, const float *w, int64_t h0, int heads, const uint16_t *v, int64_t vts, int64_t n,
                     int64_t d, int64_t c) {
    __m512 a[4];
    for (int h = 0; h < heads; h++) a[h] = _mm512_loadu_ps(acc + (h0 + h) * d + c);
    int64_t groups = n - n % 4;
    for (int64_t t = 0; t < groups; t += 4) {
        __m512 r0 = widen16(v + t * vts + c), r1 = widen16(v + (t + 1) * vts + c);
        __m512 r2 = widen16(v + (t + 2) * vts + c), r3 = widen16(v + (t + 3) * vts + c);
        for (int h = 0; h < heads; h++) {
            const float *wr = w + (h0 + h) * SPLIT + t;
            __m512 even = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(wr[0]), r0),
                                        _mm512_mul_ps(_mm512_set1_ps(wr[2]), r2));
            __m512 odd = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(wr[1]), r1),
                                       _mm512_mul_ps(_mm512_set1_ps(wr[3]), r3));
            a[h] = _mm512_add_ps(a[h], _mm512_add_ps(even, odd));
        }
    }
    for (int64_t t = n - 1; t >= groups; t--) {
        __m512 r = widen16(v + t * vts + c);
        for (int h = 0; h < heads; h++)
            a[h] = _mm512_add_ps(a[h], _mm512_mul_ps(_mm512_set1_ps(w[(h0 + h) * SPLIT + t]), r));
    }
    for (int h = 0; h < heads; h++) _mm512_storeu_ps(acc + (h0 + h) * d + c, a[h]);
}
#endif

static void gather(float *acc, const float *w, int64_t rep, const uint16_t *v, int64_t vts, int64_t n, int64_t d,
                   float *rows) {
#if defined(__AVX512F__)
    if (d % 16 == 0) {
        for (int64_t c = 0; c < d; c += 16)
            for (int64_t h0 = 0; h0 < rep; h0 += 4)
                gather16(acc, w, h0, rep - h0 < 4 ? (int)(rep - h0) : 4, v, vts, n, d, c);
        return;
    }
#endif
    int64_t groups = n - n % 4;
    const float *r0 = rows, *r1 = rows + d, *r2 = rows + 2 * d, *r3 = rows + 3 * d;
    for (int64_t t = 0; t < groups; t += 4) {
        for (int j = 0; j < 4; j++)
            for (int64_t i = 0; i < d; i++) rows[j * d + i] = bf16_f32(v[(t + j) * vts + i]);
        for (int64_t r = 0; r < rep; r++) {
            const float *wr = w + r * SPLIT + t;
            float w0 = wr[0], w1 = wr[1], w2 = wr[2], w3 = wr[3], *a = acc + r * d;
            for (int64_t i = 0; i < d; i++) a[i] = a[i] + ((w0 * r0[i] + w2 * r2[i]) + (w1 * r1[i] + w3 * r3[i]));
        }
    }
    for (int64_t t = n - 1; t >= groups; t--) {
        for (int64_t i = 0; i < d; i++) rows[i] = bf16_f32(v[t * vts + i]);
        for (int64_t r = 0; r < rep; r++) {
            float wt = w[r * SPLIT + t], *a = acc + r * d;
            for (int64_t i = 0; i < d; i++) a[i] = a[i] + wt * r0[i];
        }
    }
}

struct bufs {
    float *qf, *qi, *acc, *rows, *sc, *w, *top, *total;
};

/* One key-value head's rep query heads (q: their first row, head stride qhs) over s tokens, into out. */
static void group(const uint16_t *q, int64_t qhs, const uint16_t *k, int64_t kts, const uint16_t *v, int64_t vts,
                  int64_t rep, int64_t s, int64_t d, float scale, uint16_t *out, int64_t ohs, const struct bufs *b) {
    for (int64_t r = 0; r < rep; r++) {
        for (int64_t i = 0; i < d; i++) b->qf[r * d + i] = bf16_f32(q[r * qhs + i]);
        b->top[r] = -INFINITY;
        b->total[r] = 0.0f;
    }
    for (int64_t r = 0; rep % 4 == 0 && r < rep; r++)  /* head r's columns i..i+3 at qi[(r / 4) * 4d + 4i + 4(r % 4)] */
        for (int64_t i = 0; i + 4 <= d; i += 4)
            memcpy(b->qi + (r / 4) * 4 * d + i * 4 + (r % 4) * 4, b->qf + r * d + i, 16);
    for (int64_t t0 = 0; t0 < s; t0 += SPLIT) {
        int64_t n = s - t0 < SPLIT ? s - t0 : SPLIT;
        scores(b->qf, b->qi, rep, k + t0 * kts, kts, n, d, scale, b->sc);
        for (int64_t r = 0; r < rep; r++) {
            float *sc = b->sc + r * SPLIT, m = b->top[r], *a = b->acc + r * d;
            for (int64_t t = 0; t < n; t++) m = sc[t] > m ? sc[t] : m;
            float sum = weigh(sc, n, m, b->w + r * SPLIT);
            float rescale = expf(b->top[r] - m);
            b->total[r] = fmaf(rescale, b->total[r], sum);
            b->top[r] = m;
            if (t0 == 0)
                memset(a, 0, sizeof(float) * d);
            else
                for (int64_t i = 0; i < d; i++) a[i] = a[i] * rescale;
        }
        gather(b->acc, b->w, rep, v + t0 * vts, vts, n, d, b->rows);
    }
    for (int64_t r = 0; r < rep; r++) {
        float inv = 1.0f / (b->total[r] == 0.0f ? 1.0f : b->total[r]);
        for (int64_t i = 0; i < d; i++) out[r * ohs + i] = f32_bf16(b->acc[r * d + i] * inv);
    }
}

/* Key-value heads [g_lo, g_hi) of moeinf_attn_exact's call. */
static int heads(const uint16_t *q, int64_t qhs, const uint16_t *k, int64_t khs, int64_t kts, const uint16_t *v,
                 int64_t vhs, int64_t vts, int64_t hq, int64_t hkv, int64_t s, int64_t d, float scale, uint16_t *out,
                 int64_t ohs, int64_t g_lo, int64_t g_hi) {
    int64_t rep = hq / hkv;
    struct bufs b = {malloc(sizeof(float) * rep * d), malloc(sizeof(float) * rep * d + 64),
                     malloc(sizeof(float) * rep * d), malloc(sizeof(float) * 4 * d),
                     malloc(sizeof(float) * rep * SPLIT), malloc(sizeof(float) * rep * SPLIT),
                     malloc(sizeof(float) * rep), malloc(sizeof(float) * rep)};
    int failed = !b.qf || !b.qi || !b.acc || !b.rows || !b.sc || !b.w || !b.top || !b.total;
    for (int64_t g = g_lo; g < g_hi && !failed; g++)
        group(q + g * rep * qhs, qhs, k + g * khs, kts, v + g * vhs, vts, rep, s, d, scale, out + g * rep * ohs, ohs,
              &b);
    free(b.qf);
    free(b.qi);
    free(b.acc);
    free(b.rows);
    free(b.sc);
    free(b.w);
    free(b.top);
    free(b.total);
    return failed ? -1 : 0;
}

/* q: [hq][d] with head stride qhs; k, v: [hkv][s][d] with head and token strides; out: [hq][d], head stride ohs.
 * Key-value heads [g_lo, g_hi), shared among ``threads`` threads (parallel.h). */
int moeinf_attn_exact(const uint16_t *q, int64_t qhs, const uint16_t *k, int64_t khs, int64_t kts, const uint16_t *v,
                      int64_t vhs, int64_t vts, int64_t hq, int64_t hkv, int64_t s, int64_t d, float scale,
                      uint16_t *out, int64_t ohs, int64_t g_lo, int64_t g_hi, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, g_lo, g_hi, 1,
                heads(q, qhs, k, khs, kts, v, vhs, vts, hq, hkv, s, d, scale, out, ohs, tlo, thi));
    return code;
}
