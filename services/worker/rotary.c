/* transformers' apply_rotary_pos_emb for one bfloat16 tensor, with torch's bits, in one call (services/worker/
 * rotary.py calls it through ctypes; built into one library with the other kernels by dequant_kernel.py).
 *
 * ``x * cos + rotate_half(x) * sin`` as torch's CPU kernels round it, op by op: each bfloat16 product widened to
 * float32, multiplied and rounded to bfloat16 (nearest even), rotate_half's negation exact, the sum of the two
 * rounded products rounded again. A decode step runs ~10 small torch calls per layer for it (slices, neg, cat,
 * four multiplies, two adds), each bringing its code back into caches the weights just streamed through; this is
 * one per tensor. services/worker/rotary.py checks it against each model's own function, bit for bit, first. */
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

static inline float widen(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t narrow(float f) {  /* c10::BFloat16's round to nearest even; a NaN is 0x7fc0 */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* x: [heads, rows, d] at element strides (x_head, x_row, 1); cos, sin: [rows, d] at row stride ``c_row``; out:
 * like x at (o_head, o_row, 1). 0, or 1 for an odd d. */
int moeinf_rotary(const uint16_t *x, int64_t heads, int64_t rows, int64_t d, int64_t x_head, int64_t x_row,
                  const uint16_t *cos, const uint16_t *sin, int64_t c_row, uint16_t *out, int64_t o_head,
                  int64_t o_row) {
    if (d % 2)
        return 1;
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t r = 0; r < rows; r++) {
            const uint16_t *in = x + h * x_head + r * x_row, *c = cos + r * c_row, *s = sin + r * c_row;
            uint16_t *o = out + h * o_head + r * o_row;
            for (int64_t i = 0; i < d; i++) {
                float rot = i < half ? -widen(in[i + half]) : widen(in[i - half]);
                float a = widen(narrow(widen(in[i]) * widen(c[i])));
                float b = widen(narrow(rot * widen(s[i])));
                o[i] = narrow(a + b);
            }
        }
    }
    return 0;
}
