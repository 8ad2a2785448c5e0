/* Dequantization kernels for the worker's quantized expert slots (services/worker/dequant_kernel.py builds this file
 * with the system's C compiler on first use and checks it against torch's ops before using it).
 *
 * Every kernel writes the same bits as the torch-op path in services/worker/quant.py, which looks every output up in
 * tables computed with transformers' own arithmetic. The tables stay the reference: the MXFP4 -> bfloat16 kernel
 * computes the common case directly (a scale byte in [2, 252]: the E2M1 value's bfloat16 bits with the scale added to
 * the exponent, exact because the product of a normal value and a representable power of two is exact) and looks
 * the rest up (tiny or huge scales: subnormals, overflow, NaN); the FP8 kernels only look up (byte shuffles where the
 * CPU has AVX-512 VBMI: ~15 G values/s on one core, 2.3x the AVX-512BW path). Single-threaded: the caller splits rows. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "mxfp4_decode.h"

/* n_blocks MXFP4 blocks with one E8M0 scale byte each into bfloat16 pairs (mxfp4_decode.h). */
void moeinf_mxfp4_bf16(const uint8_t *blocks, const uint8_t *scales, const uint32_t *pairs, uint32_t *out,
                       int64_t n_blocks) {
    mxfp4_decode(blocks, scales, pairs, out, n_blocks);
}

/* The same by table only, for pairs of 2-byte (float16: uint32 pairs) or 4-byte (float32: uint64 pairs) values. */
#define MXFP4_GATHER(NAME, T)                                                                                        \
    void NAME(const uint8_t *blocks, const uint8_t *scales, const T *pairs, T *out, int64_t n_blocks) {             \
        for (int64_t i = 0; i < n_blocks; i++) {                                                                     \
            const T *t = pairs + ((size_t)scales[i] << 8);                                                           \
            const uint8_t *b = blocks + i * 16;                                                                      \
            T *o = out + i * 16;                                                                                     \
            for (int j = 0; j < 16; j++) o[j] = t[b[j]];                                                             \
        }                                                                                                            \
    }

MXFP4_GATHER(moeinf_mxfp4_u32, uint32_t)
MXFP4_GATHER(moeinf_mxfp4_u64, uint64_t)

/* Block FP8: rows [row0, row0 + n_rows) of a [rows, cols] float8 matrix whose (block_r x block_c) blocks each have a
 * 256-entry table of their values already scaled and rounded (quant.QuantParam's block_table, grid_c blocks per
 * block row). One output value per byte, 2-byte (bfloat16, float16) or 4-byte (float32) values. */
#define FP8_GATHER(NAME, T)                                                                                          \
    void NAME(const uint8_t *values, const T *table, T *out, int64_t row0, int64_t n_rows, int64_t cols,            \
              int64_t block_r, int64_t block_c) {                                                                    \
        int64_t grid_c = (cols + block_c - 1) / block_c;                                                              \
        for (int64_t r = row0; r < row0 + n_rows; r++) {                                                              \
            const uint8_t *v = values + r * cols;                                                                    \
            T *o = out + r * cols;                                                                                   \
            for (int64_t cb = 0; cb < grid_c; cb++) {                                                                \
                const T *t = table + (size_t)((r / block_r) * grid_c + cb) * 256;                                    \
                int64_t end = (cb + 1) * block_c < cols ? (cb + 1) * block_c : cols;                                  \
                for (int64_t c = cb * block_c; c < end; c++) o[c] = t[v[c]];                                         \
            }                                                                                                        \
        }                                                                                                            \
    }

FP8_GATHER(moeinf_fp8_scalar_u16, uint16_t)
FP8_GATHER(moeinf_fp8_u32, uint32_t)

/* bfloat16 outputs computed, not looked up, for CPUs without AVX-512 VBMI (AVX2: most of today's x86 servers and
 * desktops): each byte's float32 value (its bits moved into place and scaled by 2^120, exact), times its block's
 * float32 scale (one IEEE rounding, as transformers' q.float() * s), rounded to nearest even into bfloat16 as torch's
 * vectorised conversion rounds (any NaN -> 0xFFFF). 16 values at a time; faster than the scalar lookup on one core.
 * scales: [rows / block_r][cols / block_c] float32; block_c a multiple of 16. */
#if defined(__AVX2__)
#include <immintrin.h>
#define FP8_DIRECT 1

static inline __m256i fp8x8_bf16(__m128i bytes, __m256 scale) {
    __m256i b = _mm256_cvtepu8_epi32(bytes);
    /* S.EEEE.MMM -> float32 bits S.0000EEEE.MMM0...: the byte moved to the top, back 4 with its sign, the sign's
     * copies cleared; times 2^120 that is the value, exactly (a subnormal E4M3 is a float32 subnormal here, made
     * normal by the product: the caller clears DAZ) */
    __m256i bits = _mm256_and_si256(_mm256_srai_epi32(_mm256_slli_epi32(b, 24), 4), _mm256_set1_epi32((int)0x87F00000));
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f)), scale);
    __m256i vb = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(vb, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(vb, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i nan = _mm256_or_si256(_mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)),  /* S.1111.111 too */
                                  _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)),
                                                     _mm256_set1_epi32(0x7F)));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), nan);
}

int moeinf_fp8_direct_fast(void) { return 1; }

void moeinf_fp8_bf16_direct(const uint8_t *values, const float *scales, uint16_t *out, int64_t row0,
                            int64_t n_rows, int64_t cols, int64_t block_r, int64_t block_c) {
    int64_t grid_c = cols / block_c;
    unsigned csr = _mm_getcsr();
    _mm_setcsr(csr & ~0x40u);  /* DAZ off: the subnormal values above are inputs of a product */
    for (int64_t r = row0; r < row0 + n_rows; r++) {
        const uint8_t *v = values + r * cols;
        uint16_t *o = out + r * cols;
        for (int64_t cb = 0; cb < grid_c; cb++) {
            __m256 scale = _mm256_set1_ps(scales[(r / block_r) * grid_c + cb]);
            for (int64_t c = cb * block_c; c < (cb + 1) * block_c; c += 16) {
                __m128i raw = _mm_loadu_si128((const __m128i *)(v + c));
                __m256i lo = fp8x8_bf16(raw, scale), hi = fp8x8_bf16(_mm_unpackhi_epi64(raw, raw), scale);
                __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
                _mm256_storeu_si256((__m256i *)(o + c), packed);
            }
        }
    }
    _mm_setcsr(csr);
}
#else
int moeinf_fp8_direct_fast(void) { return 0; }

void moeinf_fp8_bf16_direct(const uint8_t *values, const float *scales, uint16_t *out, int64_t row0,
                            int64_t n_rows, int64_t cols, int64_t block_r, int64_t block_c) {
    (void)values; (void)scales; (void)out; (void)row0; (void)n_rows; (void)cols; (void)block_r; (void)block_c;
}
#endif

/* 2-byte values with AVX-512 VBMI: the block's 256-entry table split into its low-byte and high-byte planes (4
 * vectors each, once per block row), then 64 lookups at a time: two 128-entry byte shuffles (vpermt2b) per plane,
 * the byte's top bit picks between them, and the planes interleave back into 2-byte values. */
#if defined(__AVX512VBMI__) && defined(__AVX512BW__) && defined(__GNUC__)
#include "fp8_lookup.h"
#define FP8_VBMI 1

void moeinf_fp8_u16(const uint8_t *values, const uint16_t *table, uint16_t *out, int64_t row0, int64_t n_rows,
                    int64_t cols, int64_t block_r, int64_t block_c) {
    int64_t grid_c = cols / block_c;
    if (block_c % 64 || grid_c > 256) {
        moeinf_fp8_scalar_u16(values, table, out, row0, n_rows, cols, block_r, block_c);
        return;
    }
    static __thread uint8_t planes[256][2][256] __attribute__((aligned(64)));  /* [column block][low, high][entry] */
    int64_t planes_of = -1;
    for (int64_t r = row0; r < row0 + n_rows; r++) {
        if (r / block_r != planes_of) {
            planes_of = r / block_r;
            for (int64_t cb = 0; cb < grid_c; cb++) {
                const uint16_t *t = table + (size_t)(planes_of * grid_c + cb) * 256;
                for (int i = 0; i < 256; i++) {
                    planes[cb][0][i] = (uint8_t)t[i];
                    planes[cb][1][i] = (uint8_t)(t[i] >> 8);
                }
            }
        }
        const uint8_t *v = values + r * cols;
        uint16_t *o = out + r * cols;
        for (int64_t cb = 0; cb < grid_c; cb++) {
            __m512i lo[4], hi[4];
            for (int k = 0; k < 4; k++) {
                lo[k] = _mm512_loadu_si512(planes[cb][0] + 64 * k);
                hi[k] = _mm512_loadu_si512(planes[cb][1] + 64 * k);
            }
            for (int64_t c = cb * block_c; c < (cb + 1) * block_c; c += 64) fp8_lookup64(v + c, o + c, lo, hi);
        }
    }
}
#endif

/* 2-byte values: with AVX-512BW and gcc, 32 lookups at a time in the block's 256-entry table held in 8 vectors:
 * one two-vector shuffle per 64 entries (vpermt2w), the byte's top two bits pick among the four. */
#if defined(FP8_VBMI)
#elif defined(__AVX512BW__) && defined(__GNUC__) && !defined(__clang__)
typedef uint8_t u8x32 __attribute__((vector_size(32)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));

void moeinf_fp8_u16(const uint8_t *values, const uint16_t *table, uint16_t *out, int64_t row0, int64_t n_rows,
                    int64_t cols, int64_t block_r, int64_t block_c) {
    if (block_c % 32) {
        moeinf_fp8_scalar_u16(values, table, out, row0, n_rows, cols, block_r, block_c);
        return;
    }
    int64_t grid_c = cols / block_c;
    for (int64_t r = row0; r < row0 + n_rows; r++) {
        const uint8_t *v = values + r * cols;
        uint16_t *o = out + r * cols;
        for (int64_t cb = 0; cb < grid_c; cb++) {
            u16x32 t[8];
            memcpy(t, table + (size_t)((r / block_r) * grid_c + cb) * 256, sizeof t);
            for (int64_t c = cb * block_c; c < (cb + 1) * block_c; c += 32) {
                u8x32 raw;
                memcpy(&raw, v + c, 32);
                u16x32 idx = __builtin_convertvector(raw, u16x32);
                u16x32 low = idx & 63, top = idx >> 6;
                u16x32 res = (__builtin_shuffle(t[0], t[1], low) & (u16x32)(top == 0))
                             | (__builtin_shuffle(t[2], t[3], low) & (u16x32)(top == 1))
                             | (__builtin_shuffle(t[4], t[5], low) & (u16x32)(top == 2))
                             | (__builtin_shuffle(t[6], t[7], low) & (u16x32)(top == 3));
                memcpy(o + c, &res, 64);
            }
        }
    }
}
#else
#define FP8_SCALAR 1
void moeinf_fp8_u16(const uint8_t *values, const uint16_t *table, uint16_t *out, int64_t row0, int64_t n_rows,
                    int64_t cols, int64_t block_r, int64_t block_c) {
    moeinf_fp8_scalar_u16(values, table, out, row0, n_rows, cols, block_r, block_c);
}
#endif

/* 1 when moeinf_fp8_u16 looks up by vector shuffles (VBMI, or AVX-512BW with gcc: 2-8x the computed AVX2 path),
 * 0 when it is the scalar gather (the computed path is faster) */
#if defined(FP8_SCALAR)
int moeinf_fp8_lookup_fast(void) { return 0; }
#else
int moeinf_fp8_lookup_fast(void) { return 1; }
#endif
