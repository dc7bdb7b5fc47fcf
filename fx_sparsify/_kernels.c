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
        if (rows <= 0 || cols <= 0) return 0; /* no entry: never walk a claimed [2**40, 0] row by row */ \
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

/* --- bitmask storage: y = x @ W^T + b (passes/_bitmask.py, squash(storage="bitmask")) ------------------
 * W [rows, cols] is held as the compressed checkpoint holds it: its kept entries `values`, row-major, and
 * a packed mask of [rows, ceil(cols / 8)] bytes, least significant bit first (bits past `cols` in a row's
 * last byte are ignored), `offsets` [rows + 1] where each row starts in `values`. fxs_bitmask_linear_<T>(
 * values, offsets, mask, cols, r0, r1, x, batch, x_stride, bias, out, out_stride) writes
 * out[b * out_stride + r] = sum_c W[r, c] * x[b * x_stride + c] (+ bias[r]) for the rows [r0, r1) and
 * b < batch (each thread takes its own range of rows). The offsets must agree with the mask (_native.py
 * checks them once per tensor). x, bias, out are float32; T is
 * float32 or bfloat16 (uint16 bits), always summed in float32. `values` must hold 32 readable entries
 * past the last kept one (the caller pads it): the vector paths load whole groups of 8 / 16.
 *
 * Three paths, picked at the first call by the CPU (fxs_bitmask_isa), the same sums in another order:
 * - AVX-512: 16 columns a step; vexpandps puts the step's kept values in their columns (zeros elsewhere)
 *   in one instruction; tiles of 4 rows of W x up to 4 rows of x share each expanded step and each load
 *   of x (the loads, not the bytes, bound one row at a time on AMD Zen 4);
 * - AVX2: 8 columns a step; a table of 256 permutations does the expand (vpermps);
 * - portable C: each row's kept columns decoded once into a list, then a dot product per row of x.
 * And at batch 1, for sparse layers, the pick path (AVX-512): fxs_bitmask_pick_<T>(values, pick, offsets, rows,
 * cols, r0, r1, x, bias, out) with the layer's pick index (fxs_bitmask_pick_index) picks x's entries at the kept
 * columns instead of expanding the values to all columns.
 */
#include <string.h>
#include <stdlib.h>

#if defined(_WIN32)
#define FXS_API __declspec(dllexport)
#else
#define FXS_API
#endif

#define FXS_BM_PAD 32

/* 0 portable C, 1 AVX2, 2 AVX-512, 3 AVX-512 with VBMI2 (and AVX512_BF16: the bfloat16 row path); -1 until the
 * first call decides by the CPU */
static int fxs_isa = -1;
static int fxs_has_dpbf16 = 0; /* AVX512_BF16 and AVX512_VBMI2 (vdpbf16ps, vpexpandw) */
#ifndef FXS_BM_L1_COLS
#define FXS_BM_L1_COLS 4096 /* batch 1: one row at a time up to this many columns; longer rows of x (past
                               * 16 KiB of L1) in tiles of 4 rows of W: 4096x11008 at 50 % went 1.0x -> 0.73x */
#endif
#ifndef FXS_TILE_AHEAD /* batch 1 in tiles (rows past FXS_BM_L1_COLS): values prefetched into L2 FXS_TILE_FAR ahead */
#define FXS_TILE_FAR 65536 /* (Zen 4, 4096x11008, 70 % zeros: 4.0-4.1 cycles per 16 columns, 4.6-4.7 without; */
#define FXS_TILE_AHEAD 1024 /* 50 %: no change) and, with at most FXS_TILE_PF_KEPT % kept, into L1 FXS_TILE_AHEAD ahead */
#define FXS_TILE_PF_KEPT 40 /* (70 %: ~0.40x dense, 0.42-0.44x without; at 50 % those cost more than they gave) */
#endif
#ifndef FXS_BM_AHEAD
/* bytes of values prefetched into L1 ahead of the batch-1 loop, and into L2 further ahead (Zen 4, 11008x4096, data
 * not in cache, cycles per 16 columns at 50 / 70 % zeros, into L1 only: 1 KiB 6.6-6.7 / 5.1-5.2, 2 KiB 6.3-6.5 /
 * 4.5-4.7, 3 KiB 6.1-6.2 / 4.4-4.6, 4 KiB 6.2 / 4.6-4.7; 3 KiB into L1 and 16 or 32 KiB into L2: 5.0 / 3.7-3.8;
 * 16 KiB into L1 as well: 7.3-7.5 / 5.2-5.5) */
#define FXS_BM_AHEAD 3072
#define FXS_BM_FAR 16384
#endif

static inline float fxs_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* the portable path */
#define FXS_BM_PORTABLE(NAME, T, LOAD)                                                                  \
    static int NAME(const T *values, const uint8_t *mask, int64_t cols, int64_t r0, int64_t r1, int64_t k0, \
                    const float *x, int64_t batch, int64_t xs, const float *bias, float *out, int64_t os) { \
        int64_t stride = (cols + 7) / 8, k = k0;                                                        \
        int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(cols > 0 ? cols : 1));              \
        float *val = (float *)malloc(sizeof(float) * (size_t)(cols > 0 ? cols : 1));                    \
        if (!idx || !val) { free(idx); free(val); return -3; }                                          \
        for (int64_t r = r0; r < r1; r++) {                                                             \
            const uint8_t *m = mask + r * stride;                                                       \
            int64_t n = 0;                                                                              \
            for (int64_t c = 0; c < cols; c++)                                                          \
                if ((m[c >> 3] >> (c & 7)) & 1u) { idx[n] = (int32_t)c; val[n] = LOAD(values[k]); n++; k++; } \
            for (int64_t b = 0; b < batch; b++) {                                                       \
                const float *xb = x + b * xs;                                                           \
                float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                           \
                int64_t j = 0;                                                                          \
                for (; j + 4 <= n; j += 4) {                                                            \
                    s0 += val[j] * xb[idx[j]]; s1 += val[j + 1] * xb[idx[j + 1]];                       \
                    s2 += val[j + 2] * xb[idx[j + 2]]; s3 += val[j + 3] * xb[idx[j + 3]];               \
                }                                                                                       \
                for (; j < n; j++) s0 += val[j] * xb[idx[j]];                                           \
                out[b * os + r] = (s0 + s1) + (s2 + s3) + (bias ? bias[r] : 0.f);                       \
            }                                                                                           \
        }                                                                                               \
        free(idx); free(val);                                                                           \
        return 0;                                                                                       \
    }

#define FXS_LOAD_F32(v) (v)
#define FXS_LOAD_BF16(v) fxs_bf16_to_f32(v)
FXS_BM_PORTABLE(fxs_bm_portable_f32, float, FXS_LOAD_F32)
FXS_BM_PORTABLE(fxs_bm_portable_bf16, uint16_t, FXS_LOAD_BF16)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(FXS_NO_SIMD)
#include <immintrin.h>
#define FXS_BM_X86 1

/* --- AVX-512 --- */
#define FXS_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,popcnt")))
#define FXS_INLINE512 static inline __attribute__((always_inline)) FXS_T512

/* a whole load then the register form of vexpandps: the memory form measured no faster (AMD Zen 4) */
FXS_INLINE512 __m512 fxs_w16_f32(const float *v, __mmask16 mm) { return _mm512_maskz_expand_ps(mm, _mm512_loadu_ps(v)); }
FXS_INLINE512 __m512 fxs_w16_bf16(const uint16_t *v, __mmask16 mm) {
    __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)v)), 16);
    return _mm512_maskz_expand_ps(mm, _mm512_castsi512_ps(w));
}

/* batch 1: one row of W at a time, 32 columns a step with two accumulators (measured faster than the
 * 4-row tile for one row of x on Zen 4); returns the index in `values` after the row */
#define FXS_ROW512(NAME, T, W16)                                                                        \
    FXS_INLINE512 int64_t NAME(const T *values, int64_t k, const uint8_t *m, int64_t cols, const float *x, \
                            int64_t xs, int NB, float *acc_out) {                                       \
        __m512 acc[8], acc2[8];                                                                         \
        for (int j = 0; j < NB; j++) { acc[j] = _mm512_setzero_ps(); acc2[j] = _mm512_setzero_ps(); }   \
        int64_t c = 0;                                                                                  \
        for (; c + 32 <= cols; c += 32) {                                                               \
            uint32_t bits;                                                                              \
            memcpy(&bits, m + (c >> 3), 4);                                                             \
            __mmask16 lo = (__mmask16)bits, hi = (__mmask16)(bits >> 16);                               \
            _mm_prefetch((const char *)(values + k) + FXS_BM_AHEAD, _MM_HINT_T0);                       \
            _mm_prefetch((const char *)(values + k) + FXS_BM_FAR, _MM_HINT_T1);                         \
            __m512 w0 = W16(values + k, lo);                                                            \
            k += _mm_popcnt_u32(lo);                                                                    \
            __m512 w1 = W16(values + k, hi);                                                            \
            k += _mm_popcnt_u32(hi);                                                                    \
            for (int j = 0; j < NB; j++) {                                                              \
                acc[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j * xs + c), acc[j]);                  \
                acc2[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + j * xs + c + 16), acc2[j]);           \
            }                                                                                           \
        }                                                                                               \
        for (; c < cols; c += 16) {                                                                     \
            int64_t left = cols - c;                                                                    \
            uint32_t bits = m[c >> 3] | (left > 8 ? (uint32_t)m[(c >> 3) + 1] << 8 : 0u);               \
            __mmask16 lanes = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);           \
            __mmask16 mm = (__mmask16)bits & lanes;                                                     \
            __m512 w = W16(values + k, mm);                                                             \
            k += _mm_popcnt_u32(mm);                                                                    \
            for (int j = 0; j < NB; j++)                                                                \
                acc[j] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, x + j * xs + c), acc[j]);      \
        }                                                                                               \
        for (int j = 0; j < NB; j++) acc_out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j], acc2[j])); \
        return k;                                                                                       \
    }

FXS_ROW512(fxs_row512_f32, float, fxs_w16_f32)
FXS_ROW512(fxs_row512_bf16, uint16_t, fxs_w16_bf16)

/* R rows of W (from row r) against NB rows of x: R x NB accumulators, kept in registers (R and NB are
 * constants after inlining). Each 16-column step of a row is expanded once and used by the NB rows of x;
 * each 16 columns of a row of x are loaded once and used by the R rows of W. */
#define FXS_TILE512(NAME, T, W16)                                                                       \
    FXS_INLINE512 void NAME(const T *values, const int64_t *offsets, const uint8_t *mask, int64_t stride,   \
                            int64_t cols, int64_t r, const float *x, int64_t xs, int R, int NB, int pf,    \
                            float *res) {                                                               \
        __m512 acc[4][4], w[4];                                                                         \
        const uint8_t *m[4];                                                                            \
        int64_t k[4];                                                                                   \
        for (int i = 0; i < R; i++) {                                                                   \
            m[i] = mask + (r + i) * stride;                                                             \
            k[i] = offsets[r + i];                                                                      \
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();                               \
        }                                                                                               \
        int64_t c = 0;                                                                                  \
        for (; c + 16 <= cols; c += 16) {                                                               \
            for (int i = 0; i < R; i++) {                                                               \
                if (NB == 1 && (c & 63) == 0) {                                                         \
                    if (pf) _mm_prefetch((const char *)(values + k[i]) + FXS_TILE_AHEAD, _MM_HINT_T0);   \
                    _mm_prefetch((const char *)(values + k[i]) + FXS_TILE_FAR, _MM_HINT_T1);            \
                }                                                                                       \
                uint16_t bits;                                                                          \
                memcpy(&bits, m[i] + (c >> 3), 2);                                                      \
                w[i] = W16(values + k[i], (__mmask16)bits);                                             \
                k[i] += _mm_popcnt_u32(bits);                                                           \
            }                                                                                           \
            for (int j = 0; j < NB; j++) {                                                              \
                __m512 xv = _mm512_loadu_ps(x + j * xs + c);                                            \
                for (int i = 0; i < R; i++) acc[i][j] = _mm512_fmadd_ps(w[i], xv, acc[i][j]);           \
            }                                                                                           \
        }                                                                                               \
        if (c < cols) { /* the last 1-15 columns: bits past `cols` ignored, x read only up to its end */ \
            int64_t left = cols - c;                                                                    \
            __mmask16 lanes = (__mmask16)((1u << left) - 1u);                                           \
            for (int i = 0; i < R; i++) {                                                               \
                uint32_t bits = m[i][c >> 3] | (left > 8 ? (uint32_t)m[i][(c >> 3) + 1] << 8 : 0u);     \
                w[i] = W16(values + k[i], (__mmask16)bits & lanes);                                     \
            }                                                                                           \
            for (int j = 0; j < NB; j++) {                                                              \
                __m512 xv = _mm512_maskz_loadu_ps(lanes, x + j * xs + c);                               \
                for (int i = 0; i < R; i++) acc[i][j] = _mm512_fmadd_ps(w[i], xv, acc[i][j]);           \
            }                                                                                           \
        }                                                                                               \
        for (int i = 0; i < R; i++)                                                                     \
            for (int j = 0; j < NB; j++) res[i * 4 + j] = _mm512_reduce_add_ps(acc[i][j]);              \
    }

FXS_TILE512(fxs_tile512_f32, float, fxs_w16_f32)
FXS_TILE512(fxs_tile512_bf16, uint16_t, fxs_w16_bf16)

/* --- AVX-512, batch 1, sparse rows: x picked by the kept entries' columns (the pick path) ---
 * Where a layer is sparse, it also holds a pick index (fxs_bitmask_pick_index), one byte stream per tile of four
 * rows: for each 64-column window, the tile's rows' kept entries there (a byte a row), then for each row its kept
 * entries' columns within the window (a byte each). A row's step is a window: 16 at a time, the kept entries'
 * columns pick their entries of x out of the window's 64 (vpmovzxbd, two vpermt2ps and a blend), and one FMA,
 * masked to the window's kept lanes, multiplies them with 16 consecutive values: the work follows the kept
 * entries, not the columns. The tile's rows share each window's loads of x (from L2 for rows past L1's size)
 * and read one index stream. On AMD Zen 4 the 11008x4096 / 4096x11008 float32 layers at 90 % zeros ran at
 * ~0.18x dense F.linear, data not in cache (the expand path: ~0.24x / ~0.32x; each row's index read as its own
 * stream: ~0.19x). The values are prefetched far ahead (FXS_PICK_AHEAD): four rows' streams run at once. */
#ifndef FXS_PICK_AHEAD
/* bytes of each row's values prefetched into L1 and, further ahead, into L2 (Zen 4, 90 % zeros, data not in cache:
 * into L1 only, 2 KiB ahead 0.23-0.28x dense, 8 KiB 0.18-0.21x, 64 KiB 0.17-0.19x; 4 KiB into L1 and 64 KiB into
 * L2: 0.14-0.15x) */
#define FXS_PICK_AHEAD 4096
#define FXS_PICK_FAR 65536
#endif

static const uint16_t fxs_lanes_of[17] = {0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047, 4095, 8191, 16383, 32767,
                                          65535};

/* the entries of x's 64-column window x0..x3 at the column numbers in the low 6 bits of id's lanes */
FXS_INLINE512 __m512 fxs_pick64(__m512 x0, __m512 x1, __m512 x2, __m512 x3, __m512i id) {
    __m512 lo = _mm512_permutex2var_ps(x0, id, x1), hi = _mm512_permutex2var_ps(x2, id, x3);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(id, _mm512_set1_epi32(32)), lo, hi);
}
/* the column numbers of 16 kept entries, a lane each */
FXS_INLINE512 __m512i fxs_cols16(const uint8_t *c8) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c8)); }
/* 16 consecutive values as float32 (lanes past a window's kept entries are left out by the masked FMA) */
FXS_INLINE512 __m512 fxs_v16_f32(const float *v) { return _mm512_loadu_ps(v); }
FXS_INLINE512 __m512 fxs_v16_bf16(const uint16_t *v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)v)), 16));
}

/* one row's window of x at xp: its n kept entries (values from v, their columns from c8) times their entries of x
 * added to acc. Most windows of a sparse row hold at most 16: the first group is picked before the branch (written otherwise,
 * with the pick inside each branch, GCC 12 no longer shared the loads of x across the tile's rows: 1.5x slower) */
#define FXS_PICK_STEP(NAME, T, V16)                                                                     \
    FXS_INLINE512 void NAME(const T *v, const uint8_t *c8, int n, const float *xp, __m512 *acc) {       \
        __m512 x0 = _mm512_loadu_ps(xp), x1 = _mm512_loadu_ps(xp + 16), x2 = _mm512_loadu_ps(xp + 32);  \
        __m512 x3 = _mm512_loadu_ps(xp + 48), p = fxs_pick64(x0, x1, x2, x3, fxs_cols16(c8));            \
        if (__builtin_expect(n <= 16, 1)) {                                                             \
            *acc = _mm512_mask3_fmadd_ps(V16(v), p, *acc, _load_mask16((__mmask16 *)&fxs_lanes_of[n])); \
            return;                                                                                     \
        }                                                                                               \
        *acc = _mm512_fmadd_ps(V16(v), p, *acc);                                                        \
        for (int q = 16; q < n; q += 16)                                                                \
            *acc = _mm512_mask3_fmadd_ps(V16(v + q), fxs_pick64(x0, x1, x2, x3, fxs_cols16(c8 + q)), *acc, \
                                         (__mmask16)fxs_lanes_of[n - q < 16 ? n - q : 16]);             \
    }
FXS_PICK_STEP(fxs_pick_step_f32, float, fxs_v16_f32)
FXS_PICK_STEP(fxs_pick_step_bf16, uint16_t, fxs_v16_bf16)

#define FXS_PICK_ONE(STEP, I, XP)                                                                       \
    if (R > I) {                                                                                        \
        int n = pk[I];                                                                                  \
        _mm_prefetch((const char *)(v + k##I) + FXS_PICK_AHEAD, _MM_HINT_T0);                           \
        _mm_prefetch((const char *)(v + k##I) + FXS_PICK_FAR, _MM_HINT_T1);                             \
        STEP(v + k##I, c, n, XP, &a##I);                                                                \
        k##I += n;                                                                                      \
        c += n;                                                                                         \
    }

/* R (1-4: a constant after inlining) rows from r (a tile's first row), each in its own accumulator */
#define FXS_PICK_ROWS(NAME, T, STEP)                                                                    \
    FXS_INLINE512 void NAME(const T *v, const uint8_t *pick, const int64_t *offsets, int64_t cols, int64_t r, \
                            int R, const float *x, const float *bias, float *out) {                     \
        int64_t nw = (cols + 63) / 64, full = cols / 64, w = 0;                                         \
        int64_t k0 = offsets[r], k1 = R > 1 ? offsets[r + 1] : 0, k2 = R > 2 ? offsets[r + 2] : 0;       \
        int64_t k3 = R > 3 ? offsets[r + 3] : 0;                                                        \
        const uint8_t *c = pick + r * nw + offsets[r];                                                  \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                     \
        for (; w < full; w++) {                                                                         \
            const float *xp = x + 64 * w;                                                               \
            const uint8_t *pk = c;                                                                      \
            c += R;                                                                                     \
            _mm_prefetch((const char *)c + FXS_PICK_AHEAD / 4, _MM_HINT_T0);                            \
            FXS_PICK_ONE(STEP, 0, xp) FXS_PICK_ONE(STEP, 1, xp) FXS_PICK_ONE(STEP, 2, xp) FXS_PICK_ONE(STEP, 3, xp) \
        }                                                                                               \
        if (full < nw) { /* the last 1-63 columns: a copy of x's end, zeros after it */                 \
            float xt[64];                                                                               \
            memset(xt, 0, sizeof xt);                                                                   \
            memcpy(xt, x + 64 * full, (size_t)(cols - 64 * full) * sizeof(float));                      \
            const uint8_t *pk = c;                                                                      \
            c += R;                                                                                     \
            FXS_PICK_ONE(STEP, 0, xt) FXS_PICK_ONE(STEP, 1, xt) FXS_PICK_ONE(STEP, 2, xt) FXS_PICK_ONE(STEP, 3, xt) \
        }                                                                                               \
        float sums[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),  \
                         _mm512_reduce_add_ps(a3)};                                                     \
        for (int i = 0; i < R; i++) out[r + i] = sums[i] + (bias ? bias[r + i] : 0.f);                 \
    }
FXS_PICK_ROWS(fxs_pick_rows_f32, float, fxs_pick_step_f32)
FXS_PICK_ROWS(fxs_pick_rows_bf16, uint16_t, fxs_pick_step_bf16)

#define FXS_PICK(NAME, T, ROWS)                                                                         \
    FXS_T512 static void NAME(const T *v, const uint8_t *pick, const int64_t *offsets, int64_t cols, int64_t r0, \
                              int64_t r1, const float *x, const float *bias, float *out) {              \
        for (int64_t r = r0; r < r1; r += 4) {                                                          \
            int64_t R = r1 - r < 4 ? r1 - r : 4;                                                        \
            if (R == 4) ROWS(v, pick, offsets, cols, r, 4, x, bias, out);                                \
            else if (R == 3) ROWS(v, pick, offsets, cols, r, 3, x, bias, out);                          \
            else if (R == 2) ROWS(v, pick, offsets, cols, r, 2, x, bias, out);                          \
            else ROWS(v, pick, offsets, cols, r, 1, x, bias, out);                                      \
        }                                                                                               \
    }
FXS_PICK(fxs_pick_f32, float, fxs_pick_rows_f32)
FXS_PICK(fxs_pick_bf16, uint16_t, fxs_pick_rows_bf16)

#define FXS_TILE_CASE(TILE, R, NB)                                                                      \
    case R * 8 + NB: TILE(values, offsets, mask, stride, cols, r, xb, xs, R, NB, pf, res); break;

#define FXS_BM_AVX512(NAME, T, TILE, ROW)                                                               \
    FXS_T512 static int NAME(const T *values, const int64_t *offsets, const uint8_t *mask, int64_t cols,   \
                             int64_t r0, int64_t r1, const float *x, int64_t batch, int64_t xs,         \
                             const float *bias, float *out, int64_t os) {                               \
        int64_t stride = (cols + 7) / 8;                                                                \
        float res[16];                                                                                  \
        int pf = batch == 1 && 100 * (offsets[r1] - offsets[r0]) <= FXS_TILE_PF_KEPT * (r1 - r0) * cols;  \
        if (batch == 1 && cols <= FXS_BM_L1_COLS) {                                                     \
            int64_t k = offsets[r0];                                                                    \
            for (int64_t r = r0; r < r1; r++) {                                                         \
                k = ROW(values, k, mask + r * stride, cols, x, xs, 1, res);                             \
                out[r] = res[0] + (bias ? bias[r] : 0.f);                                               \
            }                                                                                           \
            return 0;                                                                                   \
        }                                                                                               \
        for (int64_t r = r0; r < r1;) {                                                                 \
            int R = r1 - r >= 4 ? 4 : 1;                                                                \
            for (int64_t b0 = 0; b0 < batch; b0 += 4) {                                                 \
                int nb = batch - b0 < 4 ? (int)(batch - b0) : 4;                                        \
                const float *xb = x + b0 * xs;                                                          \
                switch (R * 8 + nb) {                                                                   \
                    FXS_TILE_CASE(TILE, 4, 1) FXS_TILE_CASE(TILE, 4, 2) FXS_TILE_CASE(TILE, 4, 3)       \
                    FXS_TILE_CASE(TILE, 4, 4) FXS_TILE_CASE(TILE, 1, 1) FXS_TILE_CASE(TILE, 1, 2)       \
                    FXS_TILE_CASE(TILE, 1, 3) FXS_TILE_CASE(TILE, 1, 4)                                 \
                }                                                                                       \
                for (int i = 0; i < R; i++)                                                             \
                    for (int j = 0; j < nb; j++)                                                        \
                        out[(b0 + j) * os + r + i] = res[i * 4 + j] + (bias ? bias[r + i] : 0.f);       \
            }                                                                                           \
            r += R;                                                                                     \
        }                                                                                               \
        return 0;                                                                                       \
    }

FXS_BM_AVX512(fxs_bm_avx512_f32, float, fxs_tile512_f32, fxs_row512_f32)
FXS_BM_AVX512(fxs_bm_avx512_bf16, uint16_t, fxs_tile512_bf16, fxs_row512_bf16)


/* --- AVX-512 BF16: bfloat16 values and a bfloat16 row of x (batch 1) ---
 * 32 columns a step: vpexpandw puts the step's kept bfloat16 values in their columns and vdpbf16ps
 * multiplies them with x in pairs into 16 float32 sums (half the steps of the float32 path). */
#define FXS_TBF __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,popcnt")))
FXS_TBF static int fxs_bm_dpbf16(const uint16_t *values, const int64_t *offsets, const uint8_t *mask, int64_t cols,
                                 int64_t r0, int64_t r1, const uint16_t *x, const float *bias, float *out) {
    int64_t stride = (cols + 7) / 8;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *m = mask + r * stride;
        int64_t k = offsets[r], c = 0;
        __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
        for (; c + 64 <= cols; c += 64) {
            uint64_t bits;
            memcpy(&bits, m + (c >> 3), 8);
            __mmask32 lo = (__mmask32)bits, hi = (__mmask32)(bits >> 32);
            _mm_prefetch((const char *)(values + k) + FXS_BM_AHEAD, _MM_HINT_T0);
            __m512i w0 = _mm512_maskz_expand_epi16(lo, _mm512_loadu_si512((const void *)(values + k)));
            k += _mm_popcnt_u32(lo);
            __m512i w1 = _mm512_maskz_expand_epi16(hi, _mm512_loadu_si512((const void *)(values + k)));
            k += _mm_popcnt_u32(hi);
            acc = _mm512_dpbf16_ps(acc, (__m512bh)w0, (__m512bh)_mm512_loadu_si512((const void *)(x + c)));
            acc2 = _mm512_dpbf16_ps(acc2, (__m512bh)w1, (__m512bh)_mm512_loadu_si512((const void *)(x + c + 32)));
        }
        for (; c < cols; c += 32) {
            int64_t left = cols - c < 32 ? cols - c : 32;
            __mmask32 lanes = left == 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1u);
            uint32_t bits = 0;
            for (int64_t i = 0; i < (left + 7) / 8; i++) bits |= (uint32_t)m[(c >> 3) + i] << (8 * i);
            __mmask32 mm = (__mmask32)bits & lanes;
            __m512i w = _mm512_maskz_expand_epi16(mm, _mm512_loadu_si512((const void *)(values + k)));
            k += _mm_popcnt_u32(mm);
            acc = _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_maskz_loadu_epi16(lanes, x + c));
        }
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc, acc2)) + (bias ? bias[r] : 0.f);
    }
    return 0;
}

/* --- AVX2 --- */
#define FXS_T256 __attribute__((target("avx2,fma,popcnt")))
#define FXS_INLINE256 static inline __attribute__((always_inline)) FXS_T256

/* byte -> for each of its 8 columns, the rank of that column among the set bits (8: not set, a zero lane) */
static int32_t fxs_perm[256][8];
static int32_t fxs_lanes[9][8];

static void fxs_bm_tables(void) {
    for (int m = 0; m < 256; m++) {
        int rank = 0;
        for (int j = 0; j < 8; j++) fxs_perm[m][j] = ((m >> j) & 1) ? rank++ : 8;
        for (int j = 0; j < 8; j++) if (fxs_perm[m][j] == 8) fxs_perm[m][j] = 7;  /* any lane; masked below */
    }
    for (int n = 0; n <= 8; n++)
        for (int j = 0; j < 8; j++) fxs_lanes[n][j] = j < n ? -1 : 0;
}

FXS_INLINE256 __m256 fxs_bitvec(uint32_t b) {  /* all ones in the lanes whose bit is set */
    __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)b), bits), bits));
}

FXS_INLINE256 __m256 fxs_w8_f32(const float *v, uint32_t b) {
    __m256 w = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v), _mm256_loadu_si256((const __m256i *)fxs_perm[b]));
    return _mm256_and_ps(w, fxs_bitvec(b));
}
FXS_INLINE256 __m256 fxs_w8_bf16(const uint16_t *v, uint32_t b) {
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)v)), 16);
    __m256 w = _mm256_permutevar8x32_ps(_mm256_castsi256_ps(u), _mm256_loadu_si256((const __m256i *)fxs_perm[b]));
    return _mm256_and_ps(w, fxs_bitvec(b));
}

FXS_INLINE256 float fxs_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

#define FXS_ROW256(NAME, T, W8)                                                                         \
    FXS_INLINE256 int64_t NAME(const T *values, int64_t k, const uint8_t *m, int64_t cols, const float *x, \
                            int64_t xs, int NB, float *acc_out) {                                       \
        __m256 acc[4], acc2[4];                                                                         \
        for (int j = 0; j < NB; j++) { acc[j] = _mm256_setzero_ps(); acc2[j] = _mm256_setzero_ps(); }   \
        int64_t c = 0;                                                                                  \
        for (; c + 16 <= cols; c += 16) {                                                               \
            uint32_t b0 = m[c >> 3], b1 = m[(c >> 3) + 1];                                              \
            __m256 w0 = W8(values + k, b0);                                                             \
            k += __builtin_popcount(b0);                                                                \
            __m256 w1 = W8(values + k, b1);                                                             \
            k += __builtin_popcount(b1);                                                                \
            for (int j = 0; j < NB; j++) {                                                              \
                acc[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * xs + c), acc[j]);                  \
                acc2[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j * xs + c + 8), acc2[j]);            \
            }                                                                                           \
        }                                                                                               \
        for (; c < cols; c += 8) {                                                                      \
            int64_t left = cols - c < 8 ? cols - c : 8;                                                 \
            uint32_t b = m[c >> 3] & ((1u << left) - 1u);                                               \
            __m256 w = W8(values + k, b);                                                               \
            k += __builtin_popcount(b);                                                                 \
            __m256i lanes = _mm256_loadu_si256((const __m256i *)fxs_lanes[left]);                       \
            for (int j = 0; j < NB; j++)                                                                \
                acc[j] = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + j * xs + c, lanes), acc[j]);         \
        }                                                                                               \
        for (int j = 0; j < NB; j++) acc_out[j] = fxs_hsum256(_mm256_add_ps(acc[j], acc2[j]));          \
        return k;                                                                                       \
    }

FXS_ROW256(fxs_row256_f32, float, fxs_w8_f32)
FXS_ROW256(fxs_row256_bf16, uint16_t, fxs_w8_bf16)

#define FXS_BM_AVX2(NAME, T, ROW)                                                                       \
    FXS_T256 static int NAME(const T *values, const uint8_t *mask, int64_t cols, int64_t r0, int64_t r1, \
                             int64_t k0, const float *x, int64_t batch, int64_t xs, const float *bias,  \
                             float *out, int64_t os) {                                                  \
        int64_t stride = (cols + 7) / 8, k = k0;                                                        \
        float acc[4];                                                                                   \
        int64_t end = k0;                                                                               \
        for (int64_t r = r0; r < r1; r++) {                                                             \
            const uint8_t *m = mask + r * stride;                                                       \
            float b = bias ? bias[r] : 0.f;                                                             \
            for (int64_t b0 = 0; b0 < batch; b0 += 4) {                                                 \
                int64_t nb = batch - b0 < 4 ? batch - b0 : 4;                                           \
                const float *xb = x + b0 * xs;                                                          \
                switch (nb) {                                                                           \
                    case 1: end = ROW(values, k, m, cols, xb, xs, 1, acc); break;                             \
                    case 2: end = ROW(values, k, m, cols, xb, xs, 2, acc); break;                             \
                    case 3: end = ROW(values, k, m, cols, xb, xs, 3, acc); break;                             \
                    default: end = ROW(values, k, m, cols, xb, xs, 4, acc); break;                            \
                }                                                                                       \
                for (int64_t j = 0; j < nb; j++) out[(b0 + j) * os + r] = acc[j] + b;                   \
            }                                                                                           \
            k = end;                                                                                    \
        }                                                                                               \
        return 0;                                                                                       \
    }

FXS_BM_AVX2(fxs_bm_avx2_f32, float, fxs_row256_f32)
FXS_BM_AVX2(fxs_bm_avx2_bf16, uint16_t, fxs_row256_bf16)
#endif

static int fxs_cpu_isa(void) {
#ifdef FXS_BM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return __builtin_cpu_supports("avx512vbmi2") ? 3 : 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

/* The path the kernels take. `want` >= 0 asks for that path (capped by what the CPU has: tests force the
 * portable one); -1 only reads. Returns the path now in use. */
FXS_API int fxs_bitmask_isa(int want) {
    if (fxs_isa < 0 || want >= 0) {
        int cpu = fxs_cpu_isa();
#ifdef FXS_BM_X86
        fxs_bm_tables();
#endif
        fxs_isa = want >= 0 && want < cpu ? want : cpu;
#ifdef FXS_BM_X86
        fxs_has_dpbf16 = cpu == 3 && __builtin_cpu_supports("avx512bf16");
#endif
    }
    return fxs_isa;
}

#ifdef FXS_BM_X86
#define FXS_BM_DISPATCH(T, SUF)                                                                         \
    if (fxs_isa >= 2) return fxs_bm_avx512_##SUF(values, offsets, mask, cols, r0, r1, x, batch, xs, bias, out, os); \
    if (fxs_isa == 1) return fxs_bm_avx2_##SUF(values, mask, cols, r0, r1, offsets[r0], x, batch, xs, bias, out, os);
#else
#define FXS_BM_DISPATCH(T, SUF)
#endif

#define FXS_BM_ENTRY(NAME, T, SUF)                                                                      \
    FXS_API int NAME(const T *values, const int64_t *offsets, const uint8_t *mask, int64_t cols, int64_t r0, \
                     int64_t r1, const float *x, int64_t batch, int64_t xs, const float *bias, float *out,  \
                     int64_t os) {                                                                      \
        if (fxs_isa < 0) fxs_bitmask_isa(-1);                                                           \
        if (cols < 0 || r0 < 0 || r1 < r0 || batch < 0) return -1;                                      \
        if (r1 == r0) return 0;                                                                         \
        FXS_BM_DISPATCH(T, SUF)                                                                         \
        return fxs_bm_portable_##SUF(values, mask, cols, r0, r1, offsets[r0], x, batch, xs, bias, out, os); \
    }

FXS_BM_ENTRY(fxs_bitmask_linear_f32, float, f32)
FXS_BM_ENTRY(fxs_bitmask_linear_bf16, uint16_t, bf16)

/* bit counts for the pick index, in any C compiler (MSVC lacks the GCC builtins) */
#if defined(__GNUC__) && !defined(FXS_PORTABLE_BITS)
#define fxs_popcount64(v) __builtin_popcountll(v)
#define fxs_ctz64(v) __builtin_ctzll(v)
#else
static int fxs_popcount64(uint64_t v) {
    int n = 0;
    for (; v; v &= v - 1) n++;
    return n;
}
static int fxs_ctz64(uint64_t v) { /* v != 0 */
    int n = 0;
    for (; !(v & 1); v >>= 1) n++;
    return n;
}
#endif

/* fxs_bitmask_pick_index(mask, rows, cols, out): a layer's pick index, rows * nw + kept bytes (nw = ceil(cols /
 * 64)): for each tile of four rows (the last: the rows left) and each window, the tile's rows' kept entries in the
 * window, then each row's kept entries' columns within the window (0-63). Tile t starts at 4t * nw + offsets[4t]. */
FXS_API void fxs_bitmask_pick_index(const uint8_t *mask, int64_t rows, int64_t cols, uint8_t *out) {
    int64_t stride = (cols + 7) / 8, nw = (cols + 63) / 64;
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        int64_t R = rows - r0 < 4 ? rows - r0 : 4;
        for (int64_t w = 0; w < nw; w++) {
            int64_t left = cols - 64 * w, nb = left >= 64 ? 8 : (left + 7) / 8;
            uint8_t *counts = out;
            out += R;
            for (int64_t i = 0; i < R; i++) {
                const uint8_t *m = mask + (r0 + i) * stride;
                uint64_t bits = 0;
                for (int64_t b = 0; b < nb; b++) bits |= (uint64_t)m[8 * w + b] << (8 * b);
                if (left < 64) bits &= (1ull << left) - 1u;
                counts[i] = (uint8_t)fxs_popcount64(bits);
                for (; bits; bits &= bits - 1) *out++ = (uint8_t)fxs_ctz64(bits);
            }
        }
    }
}

/* fxs_bitmask_pick_check(pick, n, offsets, rows, cols): 0 where the n bytes of `pick` are laid out as the pick
 * index of rows with those offsets (each row's window counts add up to its kept entries, the tiles fill n bytes
 * exactly), else -1. */
FXS_API int fxs_bitmask_pick_check(const uint8_t *pick, int64_t n, const int64_t *offsets, int64_t rows, int64_t cols) {
    int64_t nw = (cols + 63) / 64, at = 0;
    if (rows < 0 || cols < 0) return -1;
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        int64_t R = rows - r0 < 4 ? rows - r0 : 4, sums[4] = {0, 0, 0, 0};
        for (int64_t w = 0; w < nw; w++) {
            if (at + R > n) return -1;
            int64_t kept = 0;
            for (int64_t i = 0; i < R; i++) {
                if (pick[at + i] > 64) return -1;
                sums[i] += pick[at + i];
                kept += pick[at + i];
            }
            at += R + kept;
        }
        for (int64_t i = 0; i < R; i++)
            if (sums[i] != offsets[r0 + i + 1] - offsets[r0 + i]) return -1;
    }
    return at == n ? 0 : -1;
}

/* fxs_bitmask_pick_<T>(values, pick, offsets, rows, cols, r0, r1, x, bias, out): out[r] = row r of W . x
 * (+ bias[r]) for the rows [r0, r1) of the `rows`, one row of float32 x, by the pick path with the layer's pick
 * index (it must agree with the offsets: _native.py checks it once; FXS_BM_PAD readable bytes after it). r0 and
 * r1 start tiles (multiples of 4, or r1 == rows): -1 otherwise; -2 where the path in use lacks AVX-512: the caller
 * takes fxs_bitmask_linear_<T>. */
#ifdef FXS_BM_X86
#define FXS_PICK_DISPATCH(PICK)                                                                         \
    if (fxs_isa >= 2) {                                                                                 \
        PICK(values, pick, offsets, cols, r0, r1, x, bias, out);                                        \
        return 0;                                                                                       \
    }
#else
#define FXS_PICK_DISPATCH(PICK)
#endif
#define FXS_PICK_ENTRY(NAME, T, PICK)                                                                   \
    FXS_API int NAME(const T *values, const uint8_t *pick, const int64_t *offsets, int64_t rows,            \
                     int64_t cols, int64_t r0, int64_t r1, const float *x, const float *bias, float *out) { \
        if (fxs_isa < 0) fxs_bitmask_isa(-1);                                                           \
        if (cols < 0 || r0 < 0 || r1 < r0 || r1 > rows || r0 % 4 || (r1 % 4 && r1 != rows)) return -1;  \
        FXS_PICK_DISPATCH(PICK)                                                                         \
        (void)values; (void)pick; (void)offsets; (void)rows; (void)x; (void)bias; (void)out;            \
        return -2;                                                                                      \
    }
FXS_PICK_ENTRY(fxs_bitmask_pick_f32, float, fxs_pick_f32)
FXS_PICK_ENTRY(fxs_bitmask_pick_bf16, uint16_t, fxs_pick_bf16)

/* fxs_bitmask_linear_bf16x1(values, offsets, mask, cols, r0, r1, x, bias, out): the bfloat16 product for one
 * bfloat16 row of x (products of bfloat16 pairs, float32 sums); -2 where the CPU (or the path forced) lacks
 * AVX512_BF16: the caller then takes fxs_bitmask_linear_bf16 with x in float32. */
FXS_API int fxs_bitmask_linear_bf16x1(const uint16_t *values, const int64_t *offsets, const uint8_t *mask, int64_t cols,
                                      int64_t r0, int64_t r1, const uint16_t *x, const float *bias, float *out) {
    if (fxs_isa < 0) fxs_bitmask_isa(-1);
    if (cols < 0 || r0 < 0 || r1 < r0) return -1;
#ifdef FXS_BM_X86
    if (fxs_isa >= 2 && fxs_has_dpbf16) return fxs_bm_dpbf16(values, offsets, mask, cols, r0, r1, x, bias, out);
#endif
    (void)values; (void)offsets; (void)mask; (void)x; (void)bias; (void)out;
    return -2;
}
