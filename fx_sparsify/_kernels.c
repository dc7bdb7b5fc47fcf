/* fx_sparsify's C kernels, built when a C compiler is there (see _native.py, which loads them).
 *
 * A plain shared library loaded with ctypes (no Python API; ctypes releases the GIL during a call).
 * pip builds it as an optional extension (setup.py); without it the callers use their torch / numpy
 * paths, with the same results. Build flags: -O3 -ffp-contract=off (no fused multiply-add: the sums
 * below must round like torch's separate multiply and add).
 */
#include <stdint.h>

/* On x86-64 Linux (ELF: ifunc) each kernel is also compiled for AVX2 and picked at load time by the CPU
 * it runs on (gcc / clang function multi-versioning); the baseline build is plain x86-64 (SSE2). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(FXS_NO_CLONES)
#define FXS_KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define FXS_KERNEL
#endif

/* Windows (not tested here): export the kernels for ctypes, and the module init symbol that setuptools
 * links an extension with (a stub: nothing imports this library as a module). */
#if defined(_WIN32)
#undef FXS_KERNEL
#define FXS_KERNEL __declspec(dllexport)
__declspec(dllexport) void *PyInit__kernels(void) { return 0; }
#endif
#if defined(_MSC_VER)
#define restrict __restrict
#define __builtin_prefetch(p) ((void)(p))
#endif

/* --- compressed checkpoints (_compressed.py) ----------------------------------------------------------
 * fxs_expand<BITS>(mask, rows, cols, values, nvalues, out) writes the dense row-major [rows, cols]
 * tensor `out` (every entry) from a packed mask of [rows, ceil(cols / 8)] bytes, least significant
 * bit first, and the kept entries `values` in row-major order. It returns the number of values used,
 * or -1 when the mask marks more than `nvalues` entries (nothing is read past the end of `values`).
 * Entries are copied as integers of the dtype's width: bit-exact for any floating dtype.
 *
 * The inner loop is branch-free (a random mask defeats the branch predictor): every slot is written
 * with values[k] masked by its bit, and k advances by the bit. It reads values[k] for unset bits too,
 * so a row takes that path only when `cols` more values remain; the last rows take a checked loop.
 */
#define FXS_EXPAND(NAME, T)                                                                             \
    FXS_KERNEL int64_t NAME(const uint8_t *mask, int64_t rows, int64_t cols, const T *values, int64_t nvalues,     \
                 T *out) {                                                                              \
        int64_t stride = (cols + 7) / 8, full = cols / 8, k = 0;                                        \
        for (int64_t r = 0; r < rows; r++) {                                                            \
            const uint8_t *m = mask + r * stride;                                                       \
            T *o = out + r * cols;                                                                      \
            int fast = k + cols <= nvalues;                                                             \
            for (int64_t i = 0; fast && i < full; i++) {                                                \
                uint32_t b = m[i];                                                                      \
                T *p = o + 8 * i;                                                                       \
                for (int j = 0; j < 8; j++) {                                                           \
                    T bit = (T)((b >> j) & 1u);                                                         \
                    p[j] = values[k] & (T)(0 - bit);                                                    \
                    k += bit;                                                                           \
                }                                                                                       \
            }                                                                                           \
            for (int64_t c = fast ? full * 8 : 0; c < cols; c++) {                                      \
                if ((m[c >> 3] >> (c & 7)) & 1u) {                                                      \
                    if (k >= nvalues) return -1;                                                        \
                    o[c] = values[k++];                                                                 \
                } else {                                                                                \
                    o[c] = 0;                                                                           \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        return k;                                                                                       \
    }

FXS_EXPAND(fxs_expand8, uint8_t)
FXS_EXPAND(fxs_expand16, uint16_t)
FXS_EXPAND(fxs_expand32, uint32_t)
FXS_EXPAND(fxs_expand64, uint64_t)

/* --- masked embedding bags under no_grad (ops.embedding_bag_masked) -----------------------------------
 * fxs_masked_bag_<T>(weight, mask, rows, dim, ids, nids, offsets, nbags, per_bag, mean, out):
 * out[b] = the sum (mean: divided by the bag's length) over ids[offsets[b] .. offsets[b + 1]) of
 * weight[id] * mask[id], in one fused pass: no gathered or cast copy of the rows. `offsets` has
 * nbags + 1 entries, or is NULL for bags of `per_bag` ids each (a 2-D input). Each product and sum is rounded as torch rounds `weight * mask` followed by
 * embedding_bag's sum, in the same order. Returns 0; -1 for offsets torch might treat otherwise
 * (offsets[0] != 0, decreasing, offsets[nbags] != nids: the caller then takes torch's path, which
 * gives torch's own result or error); -2 for an id outside [0, rows) (nothing is read).
 */
#ifndef FXS_PREFETCH
#define FXS_PREFETCH 8
#endif

/* Prefetch the weight and mask rows of the id FXS_PREFETCH places after i: random rows miss the caches. */
#define FXS_PREFETCH_AHEAD(T, i)                                                                        \
    if ((i) + FXS_PREFETCH < nids) {                                                                    \
        const char *ahead = (const char *)(weight + ids[(i) + FXS_PREFETCH] * dim);                     \
        for (int64_t c = 0; c < dim * (int64_t)sizeof(T); c += 64) __builtin_prefetch(ahead + c);       \
        __builtin_prefetch(mask + ids[(i) + FXS_PREFETCH] * dim);                                       \
    }

#define FXS_MASKED_BAG(NAME, T)                                                                         \
    FXS_KERNEL int NAME(const T *restrict weight, const uint8_t *restrict mask, int64_t rows, int64_t dim, \
                        const int64_t *ids, int64_t nids, const int64_t *offsets, int64_t nbags,              \
                        int64_t per_bag, int mean, T *restrict out) {                                   \
        if (offsets ? offsets[0] != 0 || offsets[nbags] != nids : nbags * per_bag != nids) return -1;   \
        for (int64_t b = 0; offsets && b < nbags; b++)                                                  \
            if (offsets[b] > offsets[b + 1]) return -1;                                                 \
        for (int64_t i = 0; i < nids; i++)                                                              \
            if (ids[i] < 0 || ids[i] >= rows) return -2;                                                \
        for (int64_t b = 0; b < nbags; b++) {                                                           \
            T *restrict o = out + b * dim;                                                              \
            for (int64_t d = 0; d < dim; d++) o[d] = 0;                                                 \
            int64_t start = offsets ? offsets[b] : b * per_bag;                                         \
            int64_t end = offsets ? offsets[b + 1] : start + per_bag;                                   \
            for (int64_t i = start; i < end; i++) {                                                     \
                FXS_PREFETCH_AHEAD(T, i)                                                                \
                const T *w = weight + ids[i] * dim;                                                     \
                const uint8_t *m = mask + ids[i] * dim;                                                 \
                for (int64_t d = 0; d < dim; d++) o[d] += w[d] * (T)m[d];                               \
            }                                                                                           \
            if (mean && end > start)                                                                    \
                for (int64_t d = 0; d < dim; d++) o[d] /= (T)(end - start);                             \
        }                                                                                               \
        return 0;                                                                                       \
    }

FXS_MASKED_BAG(fxs_masked_bag_f32, float)
FXS_MASKED_BAG(fxs_masked_bag_f64, double)

/* --- masked embedding rows under no_grad (ops.embedding_masked) ---------------------------------------
 * fxs_masked_rows_<T>(weight, mask, rows, dim, ids, nids, out): out[i] = weight[ids[i]] * mask[ids[i]]
 * (the product rounded as torch's `weight * mask`), one pass, no gathered mask or cast copy. Returns 0,
 * or -2 for an id outside [0, rows) (checked before anything is written).
 */
#define FXS_MASKED_ROWS(NAME, T)                                                                        \
    FXS_KERNEL int NAME(const T *restrict weight, const uint8_t *restrict mask, int64_t rows, int64_t dim, \
                        const int64_t *ids, int64_t nids, T *restrict out) {                            \
        for (int64_t i = 0; i < nids; i++)                                                              \
            if (ids[i] < 0 || ids[i] >= rows) return -2;                                                \
        for (int64_t i = 0; i < nids; i++) {                                                            \
            FXS_PREFETCH_AHEAD(T, i)                                                                    \
            const T *w = weight + ids[i] * dim;                                                         \
            const uint8_t *m = mask + ids[i] * dim;                                                     \
            T *o = out + i * dim;                                                                       \
            for (int64_t d = 0; d < dim; d++) o[d] = w[d] * (T)m[d];                                    \
        }                                                                                               \
        return 0;                                                                                       \
    }

FXS_MASKED_ROWS(fxs_masked_rows_f32, float)
FXS_MASKED_ROWS(fxs_masked_rows_f64, double)
