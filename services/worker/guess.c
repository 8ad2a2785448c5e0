/* Hidden-state guesses for one token in one call (services/worker/speculate.py's CPU path; built into one library
 * with the other kernels by services/worker/dequant_kernel.py).
 *
 * What Speculator.launch + pick compute in ~12 torch and numpy calls (each cold in the caches after a layer's
 * weights streamed through them: ~0.3 ms a layer at partial residency, on the critical path of every decode
 * layer): the hidden state, optionally times 1 / its layer's norm gain; its products with the next k layers' router
 * rows, plus the bias; per target layer the softmax over its experts, its top ``top`` experts, and those whose
 * probability reaches ``threshold`` on a layer that has a router. The routers are float32 (the CPU's usual copy) or
 * bfloat16, where the scaled input and the logits are rounded to bfloat16 as torch's bfloat16 ops round them. The
 * sums run in another order than torch's, so a probability may differ from torch's in its last bits (with
 * bfloat16 routers, by a rounding of the logit), and experts tied exactly go to the lower index (numpy's partition
 * picks either): these are guesses (what to prefetch), never the model's routing. */
#include <math.h>
#include <stdint.h>

#include "matvec_common.h"

#define GUESS_MAX_HIDDEN 16384  /* (speculate.py's GUESS_MAX_* say the same) */
#define GUESS_MAX_EXPERTS 512
#define GUESS_MAX_TOP 16
#define GUESS_LANES 16

static float dot_bf16(const float *x, const uint16_t *w, int64_t n) {
    float acc[GUESS_LANES] = {0};
    int64_t i = 0;
    for (; i + GUESS_LANES <= n; i += GUESS_LANES)
        for (int j = 0; j < GUESS_LANES; j++)
            acc[j] += x[i + j] * bf16_f32(w[i + j]);
    float sum = 0.0f;
    for (int j = 0; j < GUESS_LANES; j++)
        sum += acc[j];
    for (; i < n; i++)
        sum += x[i] * bf16_f32(w[i]);
    return sum;
}

static float dot_f32(const float *x, const float *w, int64_t n) {
    float acc[GUESS_LANES] = {0};
    int64_t i = 0;
    for (; i + GUESS_LANES <= n; i += GUESS_LANES)
        for (int j = 0; j < GUESS_LANES; j++)
            acc[j] += x[i + j] * w[i + j];
    float sum = 0.0f;
    for (int j = 0; j < GUESS_LANES; j++)
        sum += acc[j];
    for (; i < n; i++)
        sum += x[i] * w[i];
    return sum;
}

/* Router row ``row``'s logit: float32 weights as they are, bfloat16 ones rounded as torch's bfloat16 linear rounds. */
static float logit(const float *xs, const void *w, const void *bias, int64_t row, int64_t h, int wide) {
    if (wide)
        return dot_f32(xs, (const float *)w + row * h, h) + ((const float *)bias)[row];
    float sum = dot_bf16(xs, (const uint16_t *)w + row * h, h) + bf16_f32(((const uint16_t *)bias)[row]);
    return bf16_f32(f32_bf16(sum));
}

/* The ``top`` largest of ``p[0..e)`` (ties: the lower index), written to ``pick`` in expert order. */
static void top_experts(const float *p, int64_t e, int64_t top, int32_t *pick) {
    uint8_t taken[GUESS_MAX_EXPERTS] = {0};
    for (int64_t t = 0; t < top; t++) {
        int64_t best = -1;
        for (int64_t i = 0; i < e; i++)
            if (!taken[i] && (best < 0 || p[i] > p[best]))
                best = i;
        taken[best] = 1;
    }
    int64_t n = 0;
    for (int64_t i = 0; i < e && n < top; i++)
        if (taken[i])
            pick[n++] = (int32_t)i;
}

/* x: the token's hidden state [h] (bfloat16); unscale: [h] float32 or NULL; w: [k * e, h] router rows (layer after
 * layer), float32 if ``wide`` else bfloat16; bias: [k * e], the same type; known: [k] (0: that layer has no router,
 * nothing guessed there).
 * Writes up to k * top guesses (layers ahead - 1, expert, probability), in target then expert order; returns how
 * many, or -1 for shapes it does not take (the caller computes them with torch). */
int moeinf_guess(const uint16_t *x, const float *unscale, int64_t h, const void *w, const void *bias, int wide,
                 int64_t k, int64_t e, int64_t top, const uint8_t *known, float threshold, int32_t *out_ahead,
                 int32_t *out_expert, float *out_conf) {
    if (h <= 0 || h > GUESS_MAX_HIDDEN || e <= 0 || e > GUESS_MAX_EXPERTS || top <= 0 || top > e
            || top > GUESS_MAX_TOP || k <= 0)
        return -1;
    float xs[GUESS_MAX_HIDDEN];
    for (int64_t i = 0; i < h; i++) {
        xs[i] = unscale ? bf16_f32(x[i]) * unscale[i] : bf16_f32(x[i]);
        xs[i] = wide ? xs[i] : bf16_f32(f32_bf16(xs[i]));  /* (torch's .to(bfloat16) of the scaled input) */
    }
    float p[GUESS_MAX_EXPERTS];
    int32_t pick[GUESS_MAX_TOP];
    int n = 0;
    for (int64_t t = 0; t < k; t++) {
        if (!known[t])
            continue;
        float most = -INFINITY, total = 0.0f;
        for (int64_t i = 0; i < e; i++) {
            p[i] = logit(xs, w, bias, t * e + i, h, wide);
            most = p[i] > most ? p[i] : most;
        }
        for (int64_t i = 0; i < e; i++) {
            p[i] = expf(p[i] - most);
            total += p[i];
        }
        for (int64_t i = 0; i < e; i++)
            p[i] /= total;
        top_experts(p, e, top, pick);
        for (int64_t j = 0; j < top; j++) {
            if (p[pick[j]] >= threshold) {
                out_ahead[n] = (int32_t)t;
                out_expert[n] = pick[j];
                out_conf[n] = p[pick[j]];
                n++;
            }
        }
    }
    return n;
}
