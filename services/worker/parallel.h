/* One kernel call's output rows shared among threads inside C (services/worker/dequant_kernel.py builds the kernels
 * with OpenMP where the compiler has it).
 *
 * The library is linked against ``libgomp.so.1``; torch's wheel loaded its own copy under that name first, and the
 * dynamic linker hands the library that one, so a call's rows go to the threads torch's own ops run on, still
 * spinning from the last op, and come back without any Python thread being woken or the GIL changing hands: ~1 us
 * per call against ~50-100 us for a Python pool's hand-over, which cost more than a thread gained on a decode step's
 * small products (and the pool's threads fought torch's spinning ones for the cores). Where the library would get
 * another runtime than torch's (another compiler, another torch build), ``dequant_kernel.Kernels`` notices and
 * calls it on one thread, as it does a library built without OpenMP: Python splits the calls then
 * (``Kernels.split``). */
#ifndef MOEINF_PARALLEL_H
#define MOEINF_PARALLEL_H
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MOEINF_HIDDEN __attribute__((visibility("hidden")))  /* a kernel only the library's own entry points call */

/* The summation orders of the bfloat16 matrix-vector kernels (moe_token.py's ORDERS): matvec.c's fast one,
 * matvec_exact.c's ATen order, matvec_onednn.c's oneDNN order; ``moeinf_product`` (matvec_threads.c) runs one. */
enum { MOEINF_ORDER_FAST = 0, MOEINF_ORDER_ATEN = 1, MOEINF_ORDER_ONEDNN = 2 };
MOEINF_HIDDEN int moeinf_product(int64_t order, const uint16_t *w, int64_t ld, const uint16_t *x, int64_t cols,
                                 int64_t rows, int64_t kb, float *y, int64_t threads);

/* Thread i of t's share of rows [lo, hi): cut points rounded up to a multiple of ``align`` rows from lo (as
 * ``Kernels.split`` cuts), so that a kernel that takes rows in groups gets whole groups. */
static inline void moeinf_share(int64_t lo, int64_t hi, int64_t align, int i, int t, int64_t *a, int64_t *b) {
    int64_t n = hi - lo, s = (n * i / t + align - 1) / align * align, e = (n * (i + 1) / t + align - 1) / align * align;
    *a = lo + (s < n ? s : n);
    *b = lo + (e < n ? e : n);
}

/* ``code = CALL`` over rows [lo, hi) on up to ``threads`` threads, each CALL seeing its own share as ``tlo``,
 * ``thi``; the codes of the shares ORed (0: all succeeded). Fewer than two rows per thread run on the caller alone. */
#ifdef _OPENMP
#define MOEINF_ROWS(code, threads, lo, hi, align, CALL)                                                             \
    do {                                                                                                            \
        int t_ = (int)((threads) < 1 ? 1 : (threads));                                                              \
        if (t_ == 1 || (hi) - (lo) < 2 * t_) {                                                                      \
            const int64_t tlo = (lo), thi = (hi);                                                                   \
            (code) = (CALL);                                                                                        \
            break;                                                                                                  \
        }                                                                                                           \
        int c_ = 0;                                                                                                 \
        _Pragma("omp parallel num_threads(t_) reduction(| : c_)")                                                   \
        {                                                                                                           \
            int64_t tlo, thi;                                                                                       \
            moeinf_share((lo), (hi), (align), omp_get_thread_num(), omp_get_num_threads(), &tlo, &thi);             \
            if (thi > tlo)                                                                                          \
                c_ |= (CALL);                                                                                       \
        }                                                                                                           \
        (code) = c_;                                                                                                \
    } while (0)
#else
#define MOEINF_ROWS(code, threads, lo, hi, align, CALL)                                                             \
    do {                                                                                                            \
        (void)(threads);                                                                                            \
        const int64_t tlo = (lo), thi = (hi);                                                                       \
        (code) = (CALL);                                                                                            \
    } while (0)
#endif

#endif
