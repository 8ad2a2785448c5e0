/* Decode attention on the CPU: one query per head against a request's cached keys and values (bfloat16), read once
 * in place (services/worker/decode_attention.py, ``--attention-kernel fast``; built into one library with the
 * other kernels by services/worker/dequant_kernel.py).
 *
 * For each key-value head g (grouped queries: heads g * rep .. g * rep + rep - 1 share it), in blocks of BLK
 * tokens: each key widened to float32 once, its dot product with every query of the group (scaled), then the
 * running softmax (the block's maximum, the accumulators rescaled by exp(old max - new max)), then each value
 * widened once and added to every query's accumulator with its weight; at the end each accumulator divided by its
 * weights' sum and rounded to bfloat16 (to nearest, ties to even). float32 throughout (e^x by a polynomial, to
 * ~2e-7), in another order than torch's kernels: results agree with sdpa to a rounding, not bit for bit (hence a
 * flag).
 * Returns 0, or -1 when its buffers cannot be allocated. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLK 64  /* tokens per block: their scores stay in L1 */
#define LANES 16  /* independent partial sums, so the compiler vectorises the dot products */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static void widen(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

/* The dot products of ``rep`` queries (rows of ``qf``, ``d`` wide) with one key row, into ``out[r * stride]``: the
 * key read once for all queries, LANES partial sums per query, added as a tree (short dependency chains). */
static void dots(const float *qf, int64_t rep, const float *row, int64_t d, float *out, int64_t stride) {
    for (int64_t r = 0; r < rep; r++) {
        const float *a = qf + r * d;
        float part[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= d; i += LANES)
            for (int j = 0; j < LANES; j++) part[j] += a[i + j] * row[i + j];
        for (int w = LANES / 2; w >= 1; w /= 2)
            for (int j = 0; j < w; j++) part[j] += part[j + w];
        float sum = part[0];
        for (; i < d; i++) sum += a[i] * row[i];
        out[r * stride] = sum;
    }
}

/* e^x for x <= 0 (a score minus the maximum), vectorisable: x = n ln2 + f, |f| <= ln2 / 2, e^f by its degree-6
 * Taylor polynomial (relative error ~2.2e-7 at worst), times 2^n put into the exponent; 0 below -87. */
static inline float exp_nonpositive(float x) {
    if (x != x) return x;  /* NaN stays NaN, as in torch */
    if (x < -87.0f) return 0.0f;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* rounded to an integer (1.5 * 2^23) */
    float f = x - n * 0.693359375f + n * 2.12194440e-4f;  /* ln2 in two parts: f exact to float32 rounding */
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += (int32_t)n << 23;
    memcpy(&p, &bits, 4);
    return p;
}

static void axpy(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* q: [hq][d] with head stride qhs; k, v: [hkv][s][d] with head and token strides; out: [hq][d], head stride ohs.
 * Key-value heads [g_lo, g_hi) only (threads split them). */
int moeinf_attn_decode(const uint16_t *q, int64_t qhs, const uint16_t *k, int64_t khs, int64_t kts,
                       const uint16_t *v, int64_t vhs, int64_t vts, int64_t hq, int64_t hkv, int64_t s, int64_t d,
                       float scale, uint16_t *out, int64_t ohs, int64_t g_lo, int64_t g_hi) {
    int64_t rep = hq / hkv;
    float *qf = malloc(sizeof(float) * rep * d), *acc = malloc(sizeof(float) * rep * d);
    float *row = malloc(sizeof(float) * d), *score = malloc(sizeof(float) * rep * BLK);
    float *top = malloc(sizeof(float) * rep), *total = malloc(sizeof(float) * rep);
    int failed = !qf || !acc || !row || !score || !top || !total;
    for (int64_t g = g_lo; g < g_hi && !failed; g++) {
        for (int64_t r = 0; r < rep; r++) {
            widen(q + (g * rep + r) * qhs, qf + r * d, d);
            for (int64_t i = 0; i < d; i++) qf[r * d + i] *= scale;
            memset(acc + r * d, 0, sizeof(float) * d);
            top[r] = -INFINITY;
            total[r] = 0.0f;
        }
        for (int64_t t0 = 0; t0 < s; t0 += BLK) {
            int64_t n = s - t0 < BLK ? s - t0 : BLK;
            for (int64_t t = 0; t < n; t++) {
                widen(k + g * khs + (t0 + t) * kts, row, d);
                dots(qf, rep, row, d, score + t, BLK);
            }
            for (int64_t r = 0; r < rep; r++) {
                float *sc = score + r * BLK, best = top[r];
                for (int64_t t = 0; t < n; t++) best = sc[t] > best ? sc[t] : best;
                if (best == -INFINITY) {  /* (only -inf scores so far: nothing to weigh yet) */
                    for (int64_t t = 0; t < n; t++) sc[t] = 0.0f;
                    continue;
                }
                float rescale = top[r] == -INFINITY ? 0.0f : exp_nonpositive(top[r] - best);
                if (rescale != 1.0f)
                    for (int64_t i = 0; i < d; i++) acc[r * d + i] *= rescale;
                total[r] *= rescale;
                top[r] = best;
                float sum = 0.0f;
                for (int64_t t = 0; t < n; t++) sc[t] = exp_nonpositive(sc[t] - best);
                for (int64_t t = 0; t < n; t++) sum += sc[t];
                total[r] += sum;
            }
            for (int64_t t = 0; t < n; t++) {
                widen(v + g * vhs + (t0 + t) * vts, row, d);
                for (int64_t r = 0; r < rep; r++) axpy(acc + r * d, score[r * BLK + t], row, d);
            }
        }
        for (int64_t r = 0; r < rep; r++) {
            float inv = total[r] > 0.0f ? 1.0f / total[r] : 0.0f;
            uint16_t *o = out + (g * rep + r) * ohs;
            for (int64_t i = 0; i < d; i++) o[i] = f32_to_bf16(acc[r * d + i] * inv);
        }
    }
    free(qf);
    free(acc);
    free(row);
    free(score);
    free(top);
    free(total);
    return failed ? -1 : 0;
}
