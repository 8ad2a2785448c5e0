/* The matrix-vector kernels' exported entry points (services/worker/kernel_matvec.py calls them through ctypes): each
 * shares its output rows [lo, hi) among ``threads`` threads (parallel.h) and runs the kernel on each share, in runs
 * of the rows the kernel takes together (64 for matvec.c's fast kernels, 16 for oneDNN's order, 8 for ATen's x @ W,
 * 1 for its dot order). The kernels themselves (``*_rows``) are in matvec.c, matvec_mxfp4.c, matvec_exact.c,
 * matvec_exact_xw.c and matvec_onednn.c, visible only inside the library. */
#include <stdint.h>

#include "parallel.h"

#ifdef _OPENMP
int moeinf_openmp(void) { return 1; }  /* the kernels share a call's rows among threads themselves */
#else
int moeinf_openmp(void) { return 0; }  /* built without OpenMP: each call runs on its caller's thread */
#endif

MOEINF_HIDDEN void moeinf_mv_bf16_nt_rows(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols,
                                          int64_t lo, int64_t hi, float *y, int64_t ldy);
MOEINF_HIDDEN int moeinf_mv_fp8_nt_rows(const uint8_t *v, int64_t ld, const float *scales, const float *table,
                                        int64_t block_r, int64_t block_c, const uint16_t *x, int64_t m, int64_t cols,
                                        int64_t lo, int64_t hi, float *y, int64_t ldy);
MOEINF_HIDDEN int moeinf_mv_mxfp4_nt_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                          const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y,
                                          int64_t ldy);
MOEINF_HIDDEN int moeinf_mv_exact_mxfp4_nt_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                                const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi,
                                                float *y, int64_t ldy);
MOEINF_HIDDEN int moeinf_mv_exact_fp8_nt_rows(const uint8_t *v, int64_t ld, const float *scales, const float *table,
                                              int64_t block_r, int64_t block_c, const uint16_t *x, int64_t m,
                                              int64_t cols, int64_t lo, int64_t hi, float *y, int64_t ldy);
MOEINF_HIDDEN int moeinf_mv_exact_nt_rows(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols,
                                          int64_t lo, int64_t hi, float *y, int64_t ldy);
MOEINF_HIDDEN int moeinf_mv_exact_xw_mxfp4_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                                const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi,
                                                float *y, int64_t ldy);
MOEINF_HIDDEN int moeinf_mv_onednn_nt_rows(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols,
                                           int64_t lo, int64_t hi, float *y, int64_t ldy, int64_t kb);
MOEINF_HIDDEN int moeinf_mv_onednn_fp8_nt_rows(const uint8_t *v, int64_t ld, const float *scales, const float *table,
                                               int64_t block_r, int64_t block_c, const uint16_t *x, int64_t m,
                                               int64_t cols, int64_t lo, int64_t hi, float *y, int64_t ldy,
                                               int64_t kb);
MOEINF_HIDDEN int moeinf_mv_onednn_mxfp4_nt_rows(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                                                 const uint32_t *pairs, const uint16_t *x, int64_t m, int64_t cols,
                                                 int64_t lo, int64_t hi, float *y, int64_t ldy, int64_t kb);

/* matvec.c, matvec_mxfp4.c */
int moeinf_mv_bf16_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                      int64_t hi, float *y, int64_t ldy, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 64, (moeinf_mv_bf16_nt_rows(w, ld, x, m, cols, tlo, thi, y, ldy), 0));
    return code;
}
int moeinf_mv_fp8_nt(const uint8_t *v, int64_t ld, const float *scales, const float *table, int64_t block_r,
                     int64_t block_c, const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y,
                     int64_t ldy, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 64, moeinf_mv_fp8_nt_rows(v, ld, scales, table, block_r, block_c, x, m, cols,
                tlo, thi, y, ldy));
    return code;
}
int moeinf_mv_mxfp4_nt(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds, const uint16_t *x,
                       int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y, int64_t ldy, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 64, moeinf_mv_mxfp4_nt_rows(blocks, ld, scales, lds, x, m, cols, tlo, thi, y,
                ldy));
    return code;
}

/* matvec_exact.c */
int moeinf_mv_exact_mxfp4_nt(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds, const uint16_t *x,
                             int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y, int64_t ldy, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 1, moeinf_mv_exact_mxfp4_nt_rows(blocks, ld, scales, lds, x, m, cols, tlo, thi,
                y, ldy));
    return code;
}
int moeinf_mv_exact_fp8_nt(const uint8_t *v, int64_t ld, const float *scales, const float *table, int64_t block_r,
                           int64_t block_c, const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi,
                           float *y, int64_t ldy, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 1, moeinf_mv_exact_fp8_nt_rows(v, ld, scales, table, block_r, block_c, x, m,
                cols, tlo, thi, y, ldy));
    return code;
}
int moeinf_mv_exact_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                       int64_t hi, float *y, int64_t ldy, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 1, moeinf_mv_exact_nt_rows(w, ld, x, m, cols, tlo, thi, y, ldy));
    return code;
}

/* matvec_exact_xw.c */
int moeinf_mv_exact_xw_mxfp4(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds, const uint16_t *x,
                             int64_t m, int64_t cols, int64_t lo, int64_t hi, float *y, int64_t ldy, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 8, moeinf_mv_exact_xw_mxfp4_rows(blocks, ld, scales, lds, x, m, cols, tlo, thi,
                y, ldy));
    return code;
}

/* matvec_onednn.c */
int moeinf_mv_onednn_nt(const uint16_t *w, int64_t ld, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                        int64_t hi, float *y, int64_t ldy, int64_t kb, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 16, moeinf_mv_onednn_nt_rows(w, ld, x, m, cols, tlo, thi, y, ldy, kb));
    return code;
}
int moeinf_mv_onednn_fp8_nt(const uint8_t *v, int64_t ld, const float *scales, const float *table, int64_t block_r,
                            int64_t block_c, const uint16_t *x, int64_t m, int64_t cols, int64_t lo, int64_t hi,
                            float *y, int64_t ldy, int64_t kb, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 16, moeinf_mv_onednn_fp8_nt_rows(v, ld, scales, table, block_r, block_c, x, m,
                cols, tlo, thi, y, ldy, kb));
    return code;
}
int moeinf_mv_onednn_mxfp4_nt(const uint8_t *blocks, int64_t ld, const uint8_t *scales, int64_t lds,
                              const uint32_t *pairs, const uint16_t *x, int64_t m, int64_t cols, int64_t lo,
                              int64_t hi, float *y, int64_t ldy, int64_t kb, int64_t threads) {
    int code;
    MOEINF_ROWS(code, threads, lo, hi, 16, moeinf_mv_onednn_mxfp4_nt_rows(blocks, ld, scales, lds, pairs, x, m, cols,
                tlo, thi, y, ldy, kb));
    return code;
}

/* One input row's product in ``order`` (MOEINF_ORDER_*; ``kb``: oneDNN's column block): y[0..rows) = w @ x, the rows
 * shared among ``threads``; 0, or -1 when the kernel refuses the shape. What moe_token.c and attention_block.c
 * multiply with: the kernel each order's Python path calls (kernel_matvec.py), so their bits are that path's. */
MOEINF_HIDDEN int moeinf_product(int64_t order, const uint16_t *w, int64_t ld, const uint16_t *x, int64_t cols,
                                 int64_t rows, int64_t kb, float *y, int64_t threads) {
    if (order == MOEINF_ORDER_ONEDNN)
        return moeinf_mv_onednn_nt(w, ld, x, 1, cols, 0, rows, y, rows, kb, threads);
    if (order == MOEINF_ORDER_ATEN)
        return moeinf_mv_exact_nt(w, ld, x, 1, cols, 0, rows, y, rows, threads);
    return moeinf_mv_bf16_nt(w, ld, x, 1, cols, 0, rows, y, rows, threads);
}
