/* RMSNorm of bfloat16 rows with torch's bits, in one call (services/worker/rms_norm.py calls it through ctypes;
 * built into one library with the other kernels by services/worker/dequant_kernel.py).
 *
 * What transformers' RMSNorm modules compute, op by op as torch's CPU kernels round it: x widened to float32,
 * squared, summed in ATen's order (SumKernel.cpp's cascade sum: vectors of ``vec`` lanes, four interleaved
 * accumulators, partial sums carried up a cascade of levels, then the lanes added in order), divided by the width,
 * plus eps, 1 / sqrt, times x; then (``style`` 0, Llama's and most families') rounded to bfloat16 and times the
 * weight, rounded again, or in float32 times 1 + the weight (1, Gemma's) or the weight (2, GPT-OSS's), rounded
 * once. A decode step runs ~8 torch calls per norm, each bringing its code back into caches the weights just
 * streamed through; this is one. services/worker/rms_norm.py checks the kernel against each norm's own forward, bit
 * for bit, before any use, for the lane count and style it finds. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "matvec_common.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define RMS_MAX_VEC 16
#define RMS_LEVELS 4
#define RMS_ILP 4

static int64_t ceil_log2(int64_t x) {  /* c10::utils::CeilLog2 */
    if (x <= 2)
        return 1;
    int64_t bits = 0;
    for (uint64_t v = (uint64_t)x - 1; v; v >>= 1)
        bits++;
    return bits;
}

/* multi_row_sum: RMS_ILP rows of ``vec``-lane vectors, ``size`` of them, vector i of row k at sq[(i * RMS_ILP + k)
 * * vec]; into out[k][lane]. */
static void multi_row_sum(const float *sq, int64_t size, int vec, float out[RMS_ILP][RMS_MAX_VEC]) {
    float acc[RMS_LEVELS][RMS_ILP][RMS_MAX_VEC];
    memset(acc, 0, sizeof(acc));
    int64_t power = ceil_log2(size) / RMS_LEVELS;
    power = power > 4 ? power : 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < RMS_ILP; k++)
                for (int l = 0; l < vec; l++)
                    acc[0][k][l] += sq[(i * RMS_ILP + k) * vec + l];
        for (int j = 1; j < RMS_LEVELS; j++) {
            for (int k = 0; k < RMS_ILP; k++)
                for (int l = 0; l < vec; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if (i & (mask << (j * power)))
                break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < RMS_ILP; k++)
            for (int l = 0; l < vec; l++)
                acc[0][k][l] += sq[(i * RMS_ILP + k) * vec + l];
    for (int j = 1; j < RMS_LEVELS; j++)
        for (int k = 0; k < RMS_ILP; k++)
            for (int l = 0; l < vec; l++)
                acc[0][k][l] += acc[j][k][l];
    memcpy(out, acc[0], sizeof(acc[0]));
}

/* The float32 sum of sq[0..n) as ATen's vectorized_inner_sum adds it (n >= vec). */
static float aten_sum(const float *sq, int64_t n, int vec) {
    const int64_t nvec = n / vec, size_ilp = nvec / RMS_ILP;
    float part[RMS_ILP][RMS_MAX_VEC];
    multi_row_sum(sq, size_ilp, vec, part);
    for (int64_t i = size_ilp * RMS_ILP; i < nvec; i++)
        for (int l = 0; l < vec; l++)
            part[0][l] += sq[i * vec + l];
    for (int k = 1; k < RMS_ILP; k++)
        for (int l = 0; l < vec; l++)
            part[0][l] += part[k][l];
    float total = 0.0f;
    for (int64_t i = nvec * vec; i < n; i++)
        total += sq[i];
    for (int l = 0; l < vec; l++)
        total += part[0][l];
    return total;
}

/* The mean of the squares of one row of ``width`` bfloat16 values, as the norm computes it (``vec`` lanes): what
 * rms_norm.py compares with torch's own to find the lane count (a row's output rarely shows it). */
float moeinf_rms_mean(const uint16_t *x, int64_t width, int64_t vec) {
    float *sq = (vec == 8 || vec == 16) && width >= vec ? malloc(sizeof(float) * (size_t)width) : NULL;
    if (sq == NULL)
        return NAN;
    for (int64_t i = 0; i < width; i++) {
        float v = bf16_f32(x[i]);
        sq[i] = v * v;
    }
    float mean = aten_sum(sq, width, (int)vec) / (float)width;
    free(sq);
    return mean;
}

/* ``rows`` rows of ``width`` bfloat16 values (row r at x + r * ldx) normalised into out (rows contiguous), under the
 * bfloat16 ``weight``. Returns 0, or -1 for a lane count or width it does not take, or no memory for its ``width``
 * floats of scratch (the caller keeps the module's own forward). */
int moeinf_rms_norm(const uint16_t *x, int64_t rows, int64_t width, int64_t ldx, const uint16_t *weight, float eps,
                    int64_t vec, int64_t style, uint16_t *out) {
    float *sq = (vec == 8 || vec == 16) && width >= vec ? malloc(sizeof(float) * (size_t)width) : NULL;
    if (sq == NULL)
        return -1;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * ldx;
        uint16_t *o = out + r * width;
        for (int64_t i = 0; i < width; i++) {
            float v = bf16_f32(row[i]);
            sq[i] = v * v;
        }
        float mean = aten_sum(sq, width, (int)vec) / (float)width;
        float inv = 1.0f / sqrtf(mean + eps);
        for (int64_t i = 0; i < width; i++) {
            float y = bf16_f32(row[i]) * inv;
            float w = bf16_f32(weight[i]);
            float v = style == 0 ? w * bf16_f32(f32_bf16(y)) : style == 1 ? y * (1.0f + w) : w * y;
            o[i] = f32_bf16(v);
        }
    }
    free(sq);
    return 0;
}
