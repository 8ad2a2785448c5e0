/* One token's pass through one MoE layer's routed experts in a single call (services/worker/moe_token.py calls it
 * through ctypes): for each of its k experts, the gate-and-up product, the gate's activation times the up half, the
 * down product, each rounded to bfloat16 where transformers' experts forward rounds it, then the outputs weighted and
 * summed. The products are the library's matrix-vector kernels (matvec.c's fast one, matvec_exact.c's ATen order or
 * matvec_onednn.c's oneDNN order) through matvec_threads.c's entry points, which share each product's rows among
 * the threads (parallel.h); the activation is a table of the model's own activation function on every bfloat16
 * value, so its bits are torch's by construction. What it replaces per expert: ~15 torch calls and their Python,
 * each paying to bring its code back into caches that the last product's weight streamed through. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "matvec_common.h"
#include "parallel.h"

/* Each product and sum rounded on its own, as torch's separate calls round them: no fused multiply-adds. */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

/* One expert's weighted output for the token: o[j] = weight * round(down(act(gate) * up))[j], in float32, rounded to
 * bfloat16 first when ``round_weighted`` (each product rounded to bfloat16, act(gate) from the table ``act``, times
 * up rounded, the product rounded: transformers' experts forward for one token). ``gu`` (2 * inter floats), ``h``
 * (inter) and ``y`` (hidden) are scratch. Returns 0, or -1 (a kernel refused the shape). */
static int expert(const uint16_t *w_gu, int64_t ld_gu, const uint16_t *w_d, int64_t ld_d, int64_t inter,
                  int64_t hidden, const uint16_t *x, float weight, int64_t round_weighted, const uint16_t *act,
                  int64_t order, int64_t kb_gu, int64_t kb_d, float *gu, uint16_t *h, float *y, float *o,
                  int64_t threads) {
    if (moeinf_product(order, w_gu, ld_gu, x, hidden, 2 * inter, kb_gu, gu, threads) != 0)
        return -1;
    for (int64_t i = 0; i < inter; i++)  /* act(gate) * up, both rounded, the product rounded */
        h[i] = f32_bf16(bf16_f32(act[f32_bf16(gu[i])]) * bf16_f32(f32_bf16(gu[inter + i])));
    if (moeinf_product(order, w_d, ld_d, h, inter, hidden, kb_d, y, threads) != 0)
        return -1;
    for (int64_t j = 0; j < hidden; j++) {
        float v = bf16_f32(f32_bf16(y[j])) * weight;
        o[j] = round_weighted ? bf16_f32(f32_bf16(v)) : v;
    }
    return 0;
}

/* ``n`` of a token's experts: for i < n, expert ``which[i]`` (its weights at ``gate_up[i]`` and ``down[i]``: a
 * [2 * inter, hidden] weight, rows ``ld_gu`` elements apart, and a [hidden, inter] one, rows ``ld_d`` apart; its
 * routing weight ``weight[which[i]]``) into ``parts + which[i] * hidden``, as ``expert`` computes it. A layer whose
 * experts are not all resident yet computes the resident ones first and the others once loaded, then sums them
 * all with ``moeinf_moe_sum``: the same bits as ``moeinf_moe_token``, whatever the order the parts came in.
 * Returns 0, or -1 (no memory, or a kernel refused the shape). */
int moeinf_moe_parts(int64_t n, const int64_t *which, const int64_t *gate_up, int64_t ld_gu, const int64_t *down,
                     int64_t ld_d, int64_t inter, int64_t hidden, const uint16_t *x, const float *weight,
                     int64_t round_weighted, const uint16_t *act, int64_t order, int64_t kb_gu, int64_t kb_d,
                     float *parts, int64_t threads) {
    float *gu = malloc(sizeof(float) * (size_t)(2 * inter + hidden));
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)inter);
    int code = gu == NULL || h == NULL ? -1 : 0;
    for (int64_t i = 0; i < n && code == 0; i++)
        code = expert((const uint16_t *)(intptr_t)gate_up[i], ld_gu, (const uint16_t *)(intptr_t)down[i], ld_d,
                      inter, hidden, x, weight[which[i]], round_weighted, act, order, kb_gu, kb_d, gu, h,
                      gu + 2 * inter, parts + which[i] * hidden, threads);
    free(gu);
    free(h);
    return code;
}

/* ``out`` (``hidden`` bfloat16) = the k parts summed in order in float32 from zero (torch's order for up to 16
 * experts), rounded once (a bfloat16 sum's NaN is the scalar conversion's, a float32 one's the vectorized .to's). */
void moeinf_moe_sum(int64_t k, const float *parts, int64_t hidden, int64_t round_weighted, uint16_t *out) {
    for (int64_t j = 0; j < hidden; j++) {
        float acc = 0.0f;
        for (int64_t e = 0; e < k; e++)
            acc += parts[e * hidden + j];
        out[j] = f32_bf16_nan(acc, round_weighted ? 0x7FC0 : 0xFFFF);
    }
}

/* ``out`` (``hidden`` bfloat16) = sum over the token's k experts e of weight[e] * down_e(act(gate_e) * up_e)
 * (``gate_up[e]``, ``down[e]`` as in ``moeinf_moe_parts``): each expert as ``expert`` computes it, the outputs
 * summed as ``moeinf_moe_sum`` sums them. Returns 0, or -1 (no memory, or a kernel refused the shape: nothing
 * usable in ``out``). */
int moeinf_moe_token(int64_t k, const int64_t *gate_up, int64_t ld_gu, const int64_t *down, int64_t ld_d,
                     int64_t inter, int64_t hidden, const uint16_t *x, const float *weight, int64_t round_weighted,
                     const uint16_t *act, int64_t order, int64_t kb_gu, int64_t kb_d, uint16_t *out,
                     int64_t threads) {
    float *parts = malloc(sizeof(float) * (size_t)(k * hidden));
    int64_t *which = malloc(sizeof(int64_t) * (size_t)k);
    int code = parts == NULL || which == NULL ? -1 : 0;
    for (int64_t e = 0; e < k && code == 0; e++)
        which[e] = e;
    if (code == 0)
        code = moeinf_moe_parts(k, which, gate_up, ld_gu, down, ld_d, inter, hidden, x, weight, round_weighted, act,
                                order, kb_gu, kb_d, parts, threads);
    if (code == 0)
        moeinf_moe_sum(k, parts, hidden, round_weighted, out);
    free(parts);
    free(which);
    return code;
}
