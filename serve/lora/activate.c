/* Copying an adapter into its pool rows on CPU, all layers and modules in one call (the role of
 * LoraPool.activate's torch loop, without its ~400 small ops).
 *
 * Semantics, for each item i (one layer of one module) and j < count[i]:
 *     a_dst[i][rows[i][j]] = j < r[i] ? a_src[i][j]                     : 0    (din[i] floats)
 *     b_dst[i][rows[i][j]] = j < r[i] ? scale[i] * b_src[i][:, j] (a column) : 0 (dout[i] floats)
 * a_src [r, din] and b_src [dout, r] are the adapter file's lora_A and lora_B, row-major. */
#include <stdint.h>
#include <string.h>

#define COLS 64 /* b_src rows transposed per pass: 64 x r floats in, r runs of 64 out */

static void transpose_scaled(float *const *dst, const float *src, int64_t r, int64_t dout, float scale)
{
    for (int64_t o0 = 0; o0 < dout; o0 += COLS) {
        const int64_t o1 = o0 + COLS < dout ? o0 + COLS : dout;
        for (int64_t j = 0; j < r; j++) {
            float *restrict d = dst[j];
            for (int64_t o = o0; o < o1; o++) d[o] = scale * src[o * r + j];
        }
    }
}

void hotswap_activate(int64_t items, const float *const *a_src, const float *const *b_src, float *const *a_dst,
                      float *const *b_dst, const int64_t *r, const int64_t *din, const int64_t *dout,
                      const float *scale, const int64_t *const *rows, const int64_t *count)
{
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < items; i++) {
        float *bs[count[i]];
        for (int64_t j = 0; j < count[i]; j++) {
            float *a = a_dst[i] + rows[i][j] * din[i];
            bs[j] = b_dst[i] + rows[i][j] * dout[i];
            if (j < r[i]) {
                memcpy(a, a_src[i] + j * din[i], din[i] * sizeof(float));
            } else {
                memset(a, 0, din[i] * sizeof(float));
                memset(bs[j], 0, dout[i] * sizeof(float));
            }
        }
        transpose_scaled(bs, b_src[i], r[i], dout[i], scale[i]);
    }
}
