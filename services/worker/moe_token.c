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

/* Each product and sum rounded on its own, as torch's separate calls round them: no fused multiply-adds. */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

/* matvec_threads.c's entry points: each shares a product's rows among ``threads`` in its kernel's runs of rows */
int moeinf_mv_bf16_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                      int64_t hi, float *y, int64_t ldy, int64_t threads);
int moeinf_mv_exact_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                       int64_t hi, float *y, int64_t ldy, int64_t threads);
int moeinf_mv_onednn_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                        int64_t hi, float *y, int64_t ldy, int64_t kb, int64_t threads);

enum { ORDER_FAST = 0, ORDER_ATEN = 1, ORDER_ONEDNN = 2 };

/* y[0..rows) = w @ x in ``order`` (kb: oneDNN's column block), the rows shared among ``threads``; 0 or -1. */
static int product(int64_t order, const uint16_t *w, int64_t ld, const uint16_t *x, int64_t cols, int64_t rows,
                   int64_t kb, float *y, int64_t threads) {
    if (order == ORDER_ONEDNN)
        return moeinf_mv_onednn_nt(w, ld, x, 1, cols, 0, rows, y, rows, kb, threads);
    if (order == ORDER_ATEN)
        return moeinf_mv_exact_nt(w, ld, x, 1, cols, 0, rows, y, rows, threads);
    return moeinf_mv_bf16_nt(w, ld, x, 1, cols, 0, rows, y, rows, threads);
}

/* ``out`` (``hidden`` bfloat16) = sum over the token's k experts e of weight[e] * down_e(act(gate_e) * up_e), where
 * gate_e and up_e are the halves of gate_up_e @ x (``gate_up[e]``: a [2 * inter, hidden] weight, rows ``ld_gu``
 * elements apart; ``down[e]``: [hidden, inter], rows ``ld_d`` apart), as transformers' experts forward computes it
 * for one token: each product rounded to bfloat16, act(gate) from the 65536-entry table ``act``, times up rounded,
 * the expert's output times its weight (rounded to bfloat16 first when ``round_weighted``: weights in bfloat16),
 * summed over the experts in order in float32 from zero (torch's order for up to 16 experts), rounded once.
 * Returns 0, or -1 (no memory, or a kernel refused the shape: nothing usable in ``out``). */
int moeinf_moe_token(int64_t k, const int64_t *gate_up, int64_t ld_gu, const int64_t *down, int64_t ld_d,
                     int64_t inter, int64_t hidden, const uint16_t *x, const float *weight, int64_t round_weighted,
                     const uint16_t *act, int64_t order, int64_t kb_gu, int64_t kb_d, uint16_t *out,
                     int64_t threads) {
    float *gu = malloc(sizeof(float) * (size_t)(2 * inter + 2 * hidden));
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)inter);
    if (gu == NULL || h == NULL) {
        free(gu);
        free(h);
        return -1;
    }
    int code = 0;
    float *y = gu + 2 * inter, *acc = y + hidden;
    for (int64_t j = 0; j < hidden; j++)
        acc[j] = 0.0f;
    for (int64_t e = 0; e < k && code == 0; e++) {
        code = product(order, (const uint16_t *)(intptr_t)gate_up[e], ld_gu, x, hidden, 2 * inter, kb_gu, gu,
                       threads);
        if (code != 0)
            break;
        for (int64_t i = 0; i < inter; i++)  /* act(gate) * up, both rounded, the product rounded */
            h[i] = f32_bf16(bf16_f32(act[f32_bf16(gu[i])]) * bf16_f32(f32_bf16(gu[inter + i])));
        code = product(order, (const uint16_t *)(intptr_t)down[e], ld_d, h, inter, hidden, kb_d, y, threads);
        if (code != 0)
            break;
        for (int64_t j = 0; j < hidden; j++) {
            float o = bf16_f32(f32_bf16(y[j])) * weight[e];
            acc[j] += round_weighted ? bf16_f32(f32_bf16(o)) : o;
        }
    }
    if (code == 0)  /* (a bfloat16 sum's NaN is the scalar conversion's, a float32 one's the vectorized .to's) */
        for (int64_t j = 0; j < hidden; j++)
            out[j] = f32_bf16_nan(acc[j], round_weighted ? 0x7FC0 : 0xFFFF);
    free(gu);
    free(h);
    return code;
}
