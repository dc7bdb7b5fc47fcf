/* The decoder of compressed checkpoints (_compressed.py), built when a C compiler is there.
 *
 * A plain shared library loaded with ctypes (no Python API): pip builds it as an optional extension
 * (setup.py); without it _compressed.py decodes with numpy, ~3x slower, with the same result.
 *
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
#include <stdint.h>

#define FXS_EXPAND(NAME, T)                                                                             \
    int64_t NAME(const uint8_t *mask, int64_t rows, int64_t cols, const T *values, int64_t nvalues,     \
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
