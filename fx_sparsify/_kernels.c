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
 *   of x (the loads, not the bytes, bound one row at a time on AMD Zen 4); with AVX512_VBMI2, batch-1 rows
 *   with few kept entries gather their entries of x instead (FXS_BM_GATHER_KEPT);
 * - AVX2: 8 columns a step; a table of 256 permutations does the expand (vpermps);
 * - portable C: each row's kept columns decoded once into a list, then a dot product per row of x.
 */
#include <string.h>
#include <stdlib.h>

#if defined(_WIN32)
#define FXS_API __declspec(dllexport)
#else
#define FXS_API
#endif

#define FXS_BM_PAD 32

/* 0 portable C, 1 AVX2, 2 AVX-512, 3 AVX-512 with VBMI2 (the gather path below for sparse rows); -1 until the
 * first call decides by the CPU */
static int fxs_isa = -1;
static int fxs_has_dpbf16 = 0; /* AVX512_BF16 and AVX512_VBMI2 (vdpbf16ps, vpexpandw) */
#ifndef FXS_BM_GATHER_KEPT /* batch 1 takes the gather path where at most this many entries in 100 are kept, */
#define FXS_BM_GATHER_KEPT 15
#endif
#ifndef FXS_BM_GATHER_KEPT_LONG /* or in rows longer than FXS_BM_L1_COLS (x read from L2) this many: measured on */
#define FXS_BM_GATHER_KEPT_LONG 12 /* Zen 4 against the expand path (4096x11008 at 85 % zeros: 0.46x vs 0.42x) */
#endif
#ifndef FXS_BM_L1_COLS
#define FXS_BM_L1_COLS 4096 /* batch 1: one row at a time up to this many columns; longer rows of x (past
                               * 16 KiB of L1) in tiles of 4 rows of W: 4096x11008 at 50 % went 1.0x -> 0.73x */
#endif
#ifndef FXS_BM_AHEAD
/* bytes of values prefetched ahead of the batch-1 loop (Zen 4, 70 % zeros: 0.38-0.40x dense, 0.43-0.44x at 1024) */
#define FXS_BM_AHEAD 2048
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
                            int64_t cols, int64_t r, const float *x, int64_t xs, int R, int NB, float *res) { \
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

/* --- AVX-512 VBMI2: sparse rows at batch 1, x gathered instead of W expanded ---
 * 64 columns a step: vpcompressb of the column numbers 0..63 under the step's 64 mask bits lists the kept
 * columns (as bytes); 16 at a time they pick their entries of x out of the step's 64 (two vpermt2ps and a
 * blend), and one FMA multiplies those with 16 consecutive kept values. The expand path costs a shuffle and an
 * FMA per 16 columns whatever the sparsity; this one costs them per 16 kept entries (plus one compress per 64
 * columns): on AMD Zen 4, ~1.6 cycles per 16 columns at 10 % kept against ~2.8. */
#define FXS_TVB __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
#define FXS_INLINEVB static inline __attribute__((always_inline)) FXS_TVB

/* the first n (all 16 from 16 on) of 16 lanes */
FXS_INLINEVB __mmask16 fxs_first16(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* the entries of the 64-column window xw[0..3] at the first n of the 16 column numbers in the low bytes of
 * `cols8`; zeros in the other lanes (their column number is 0: x's inf there times a zero value would be NaN) */
FXS_INLINEVB __m512 fxs_pick64(const __m512 *xw, __m128i cols8, int n) {
    __m512i id = _mm512_cvtepu8_epi32(cols8);
    __mmask16 k = fxs_first16(n);
    __m512 lo = _mm512_maskz_permutex2var_ps(k, xw[0], id, xw[1]), hi = _mm512_maskz_permutex2var_ps(k, xw[2], id, xw[3]);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(id, _mm512_set1_epi32(32)), lo, hi);
}
FXS_INLINEVB __m512 fxs_v16_f32(const float *v, int n) { return _mm512_maskz_loadu_ps(fxs_first16(n), v); }
FXS_INLINEVB __m512 fxs_v16_bf16(const uint16_t *v, int n) {
    __m256i h = _mm256_maskz_loadu_epi16(fxs_first16(n), v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* one 64-column step of one row: adds the step's products to acc / acc2, returns the kept entries used */
#define FXS_GATHER_STEP(NAME, T, V16)                                                                   \
    FXS_INLINEVB int NAME(const T *v, uint64_t bits, const __m512 *xw, __m512 *acc, __m512 *acc2) {     \
        const __m512i iota = _mm512_set_epi8(63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, \
                                             45, 44, 43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, \
                                             28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, \
                                             11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);                     \
        int n = (int)_mm_popcnt_u64(bits);                                                              \
        __m512i kept = _mm512_maskz_compress_epi8(bits, iota);                                          \
        *acc = _mm512_fmadd_ps(V16(v, n), fxs_pick64(xw, _mm512_castsi512_si128(kept), n), *acc);         \
        if (n > 16) {                                                                                   \
            *acc2 = _mm512_fmadd_ps(V16(v + 16, n - 16), fxs_pick64(xw, _mm512_extracti32x4_epi32(kept, 1), n - 16), *acc2); \
            if (n > 32) {                                                                               \
                *acc = _mm512_fmadd_ps(V16(v + 32, n - 32), fxs_pick64(xw, _mm512_extracti32x4_epi32(kept, 2), n - 32), *acc); \
                if (n > 48)                                                                             \
                    *acc2 = _mm512_fmadd_ps(V16(v + 48, n - 48), fxs_pick64(xw, _mm512_extracti32x4_epi32(kept, 3), n - 48), \
                                            *acc2);                                                     \
            }                                                                                           \
        }                                                                                               \
        return n;                                                                                       \
    }

/* the 64 mask bits of a row from column c (fewer at the row's end: no byte read past it) and the 64 entries of x
 * there (zeros past the end) */
FXS_INLINEVB uint64_t fxs_window64(const uint8_t *m, const float *x, int64_t c, int64_t cols, __m512 *xw) {
    int64_t left = cols - c;
    uint64_t bits = 0;
    if (left >= 64) {
        memcpy(&bits, m + (c >> 3), 8);
        for (int i = 0; i < 4; i++) xw[i] = _mm512_loadu_ps(x + c + 16 * i);
        return bits;
    }
    for (int64_t i = 0; i < (left + 7) / 8; i++) bits |= (uint64_t)m[(c >> 3) + i] << (8 * i);
    for (int i = 0; i < 4; i++) {
        int64_t l = left - 16 * i;
        __mmask16 lanes = l >= 16 ? (__mmask16)0xFFFF : l <= 0 ? 0 : (__mmask16)((1u << l) - 1u);
        xw[i] = _mm512_maskz_loadu_ps(lanes, x + c + 16 * i);
    }
    return bits & ((1ull << left) - 1u);
}

/* rows r0..r1 one at a time (two rows sharing the loads of x measured slower: two streams of values) */
#define FXS_GATHER_ROWS(NAME, T, STEP)                                                                  \
    FXS_TVB static void NAME(const T *values, const int64_t *offsets, const uint8_t *mask, int64_t cols,  \
                             int64_t r0, int64_t r1, const float *x, const float *bias, float *out) {    \
        int64_t stride = (cols + 7) / 8;                                                                \
        for (int64_t r = r0; r < r1; r++) {                                                             \
            const uint8_t *m = mask + r * stride;                                                       \
            int64_t k = offsets[r];                                                                     \
            __m512 acc = _mm512_setzero_ps(), acc2 = acc, xw[4];                                        \
            for (int64_t c = 0; c < cols; c += 64) {                                                    \
                _mm_prefetch((const char *)(values + k) + FXS_BM_AHEAD, _MM_HINT_T0);                   \
                k += STEP(values + k, fxs_window64(m, x, c, cols, xw), xw, &acc, &acc2);                \
            }                                                                                           \
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc, acc2)) + (bias ? bias[r] : 0.f);           \
        }                                                                                               \
    }

FXS_GATHER_STEP(fxs_gather_step_f32, float, fxs_v16_f32)
FXS_GATHER_STEP(fxs_gather_step_bf16, uint16_t, fxs_v16_bf16)
FXS_GATHER_ROWS(fxs_gather_f32, float, fxs_gather_step_f32)
FXS_GATHER_ROWS(fxs_gather_bf16, uint16_t, fxs_gather_step_bf16)

#define FXS_TILE_CASE(TILE, R, NB)                                                                      \
    case R * 8 + NB: TILE(values, offsets, mask, stride, cols, r, xb, xs, R, NB, res); break;

#define FXS_BM_AVX512(NAME, T, TILE, ROW, GATHER)                                                               \
    FXS_T512 static int NAME(const T *values, const int64_t *offsets, const uint8_t *mask, int64_t cols,   \
                             int64_t r0, int64_t r1, const float *x, int64_t batch, int64_t xs,         \
                             const float *bias, float *out, int64_t os) {                               \
        int64_t stride = (cols + 7) / 8;                                                                \
        float res[16];                                                                                  \
        if (batch == 1 && fxs_isa == 3 &&                                                               \
            100 * (offsets[r1] - offsets[r0]) <=                                                        \
                (cols <= FXS_BM_L1_COLS ? FXS_BM_GATHER_KEPT : FXS_BM_GATHER_KEPT_LONG) * (r1 - r0) * cols) { \
            GATHER(values, offsets, mask, cols, r0, r1, x, bias, out);                                  \
            return 0;                                                                                   \
        }                                                                                               \
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

FXS_BM_AVX512(fxs_bm_avx512_f32, float, fxs_tile512_f32, fxs_row512_f32, fxs_gather_f32)
FXS_BM_AVX512(fxs_bm_avx512_bf16, uint16_t, fxs_tile512_bf16, fxs_row512_bf16, fxs_gather_bf16)


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
