/* A mixture-of-experts router's decode rows in one call, with torch's bits (services/worker/router_kernel.py calls
 * it through ctypes; built into one library with the other kernels by services/worker/dequant_kernel.py).
 *
 * What transformers' softmax-then-top-k routers (Mixtral's, Qwen's, OLMoE's, Jamba's, ...) compute, op by op as
 * torch's CPU kernels round it: the logits as F.linear gives them (the exact kernel's float32 sums in torch's
 * order, matvec_exact.c or matvec_onednn.c, rounded once to bfloat16), widened to float32; softmax over the experts
 * as ATen's vectorized last-dimension softmax runs it (SoftMaxKernel.cpp: the maximum, exp(x - max) by the very
 * exp function torch calls, Sleef's, whose address the caller passes; the sum as vec::reduce_all adds it, in
 * vectors of ``lanes`` then the lanes pairwise, or one by one below a vector; times 1 / sum); the top k, largest
 * first; optionally divided by their sum (added one by one, as ATen sums up to 4 values: a larger k with the division
is declined); the scores
 * in float32 or rounded to bfloat16. A decode step runs ~8 torch calls per router, each bringing its code back into
 * caches the last weights streamed through: ~150 us a layer on the bench preset, ~25 us in one call.
 *
 * Declined (the caller runs the module's own forward): a logit that is not finite, and any tie among the k + 1
 * largest probabilities (torch's top-k orders equal values its own way). router_kernel.py checks every router
 * against its own forward, bit for bit, before any use. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "matvec_common.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define ROUTE_MAX_EXPERTS 1024
#define ROUTE_MAX_K 64
#define ROUTE_RENORM_MAX_K 4  /* ATen sums a short last dimension one by one up to 4 values (5-7: in 4 parts, ...) */

int moeinf_mv_exact_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                       int64_t hi, float *y, int64_t ldy, int64_t threads);
int moeinf_mv_onednn_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                        int64_t hi, float *y, int64_t ldy, int64_t kb, int64_t threads);

/* Which exp vector widths this build can call (Sleef's functions take and return vectors in registers). */
int moeinf_route_lanes(void) {
    int lanes = 0;
#if defined(__AVX512F__)
    lanes |= 16;
#endif
#if defined(__AVX2__)
    lanes |= 8;
#endif
    return lanes;
}

/* out[0..n) = exp(in[0..n)) by ``fn`` on vectors of ``lanes``, the last one zero-padded (as Vectorized::loadu with
 * a count loads it). */
static int exp_rows(const float *in, float *out, int64_t n, int64_t lanes, const void *fn) {
    float buf[16];
    for (int64_t i = 0; i < n; i += lanes) {
        int64_t c = n - i < lanes ? n - i : lanes;
        memset(buf, 0, sizeof(buf));
        memcpy(buf, in + i, (size_t)c * sizeof(float));
        if (lanes == 16) {
#if defined(__AVX512F__)
            __m512 (*exp16)(__m512) = (__m512 (*)(__m512))fn;
            _mm512_storeu_ps(buf, exp16(_mm512_loadu_ps(buf)));
#else
            return -1;
#endif
        } else if (lanes == 8) {
#if defined(__AVX2__)
            __m256 (*exp8)(__m256) = (__m256 (*)(__m256))fn;
            _mm256_storeu_ps(buf, exp8(_mm256_loadu_ps(buf)));
#else
            return -1;
#endif
        } else {
            return -1;
        }
        memcpy(out + i, buf, (size_t)c * sizeof(float));
    }
    return 0;
}

/* vec::reduce_all's sum of t[0..n): below one vector, lane by lane; else vectors added in order (the partial last
 * one into its first lanes), then the lanes pairwise (lane i with i + half, halving). */
static float reduce_sum(const float *t, int64_t n, int64_t lanes) {
    if (n < lanes) {
        float s = t[0];
        for (int64_t i = 1; i < n; i++)
            s += t[i];
        return s;
    }
    float acc[16];
    memcpy(acc, t, (size_t)lanes * sizeof(float));
    int64_t d = lanes;
    for (; d < n - n % lanes; d += lanes)
        for (int64_t l = 0; l < lanes; l++)
            acc[l] += t[d + l];
    for (int64_t l = 0; l < n - d; l++)
        acc[l] += t[d + l];
    for (int64_t half = lanes / 2; half >= 1; half /= 2)
        for (int64_t l = 0; l < half; l++)
            acc[l] = acc[l] + acc[l + half];
    return acc[0];
}

/* Softmax of one row of float logits into p; nonzero when a logit is not finite. */
static int softmax_row(const float *z, float *p, int64_t n, int64_t lanes, const void *exp_fn) {
    float shifted[ROUTE_MAX_EXPERTS];
    float max = z[0];
    for (int64_t e = 0; e < n; e++) {
        if (!isfinite(z[e]))
            return 1;
        max = z[e] > max ? z[e] : max;
    }
    for (int64_t e = 0; e < n; e++)
        shifted[e] = z[e] - max;
    if (exp_rows(shifted, p, n, lanes, exp_fn))
        return -1;
    float inv = 1.0f / reduce_sum(p, n, lanes);
    for (int64_t e = 0; e < n; e++)
        p[e] = p[e] * inv;
    return 0;
}

/* The k largest of p, largest first, into value/index; nonzero on a tie among the k + 1 largest. */
static int top_k(const float *p, int64_t n, int64_t k, float *value, int64_t *index) {
    int64_t want = k < n ? k + 1 : k;
    float v[ROUTE_MAX_K + 1];
    int64_t ix[ROUTE_MAX_K + 1];
    for (int64_t j = 0; j < want; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < n; e++) {
            int taken = 0;
            for (int64_t q = 0; q < j && !taken; q++)
                taken = ix[q] == e;
            if (!taken && (best < 0 || p[e] > p[best]))
                best = e;
        }
        ix[j] = best;
        v[j] = p[best];
        if (j > 0 && !(v[j] < v[j - 1]))
            return 1;
    }
    memcpy(value, v, (size_t)k * sizeof(float));
    memcpy(index, ix, (size_t)k * sizeof(int64_t));
    return 0;
}

/* The router of ``experts`` rows ``w`` ([experts, cols] bfloat16, rows ``ld`` apart) on ``m`` bfloat16 rows ``x``
 * ([m, cols], contiguous): logits [m, experts] bfloat16, scores [m, k] (float32, or bfloat16 when ``bf16_scores``),
 * indices [m, k]. ``block``: oneDNN's column block for this product (0: ATen's AVX2 order); ``scratch``: m * experts
 * floats. Returns 0, 1 when declined (a logit not finite, a tie), -1 when it cannot run here. */
int moeinf_route(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t experts,
                 int64_t block, int64_t k, int64_t lanes, const void *exp_fn, int64_t renorm, int64_t bf16_scores,
                 float *scratch, uint16_t *logits, void *scores, int64_t *indices) {
    if (experts < 1 || experts > ROUTE_MAX_EXPERTS || k < 1 || k > ROUTE_MAX_K || k > experts || !exp_fn
            || (lanes != 8 && lanes != 16) || (renorm && k > ROUTE_RENORM_MAX_K))
        return -1;
    int code = block ? moeinf_mv_onednn_nt(w, ld, x, m, cols, 0, experts, scratch, experts, block, 1)
                     : moeinf_mv_exact_nt(w, ld, x, m, cols, 0, experts, scratch, experts, 1);
    if (code)
        return -1;
    float z[ROUTE_MAX_EXPERTS], p[ROUTE_MAX_EXPERTS], top[ROUTE_MAX_K];
    for (int64_t r = 0; r < m; r++) {
        for (int64_t e = 0; e < experts; e++) {
            logits[r * experts + e] = f32_bf16(scratch[r * experts + e]);
            z[e] = bf16_f32(logits[r * experts + e]);
        }
        if ((code = softmax_row(z, p, experts, lanes, exp_fn)) != 0 || top_k(p, experts, k, top, indices + r * k))
            return code < 0 ? -1 : 1;
        if (renorm) {
            float sum = 0.0f;  /* ATen's sum of up to 4 values: from zero, one by one */
            for (int64_t j = 0; j < k; j++)
                sum += top[j];
            for (int64_t j = 0; j < k; j++)
                top[j] = top[j] / sum;
        }
        for (int64_t j = 0; j < k; j++) {
            if (bf16_scores)
                ((uint16_t *)scores)[r * k + j] = f32_bf16(top[j]);
            else
                ((float *)scores)[r * k + j] = top[j];
        }
    }
    return 0;
}
