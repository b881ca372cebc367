/* Copying an adapter into its pool rows on CPU, all layers and modules in one call (the role of
 * LoraPool.activate's torch loop, without its ~400 small ops).
 *
 * Semantics, for each item i (one layer of one module) and j < count[i]:
 *     a_dst[i][rows[i][j]] = j < r[i] ? a_src[i][j]                     : 0    (din[i] values)
 *     b_dst[i][rows[i][j]] = j < r[i] ? scale[i] * b_src[i][:, j] (a column) : 0 (dout[i] values)
 * a_src [r, din] and b_src [dout, r] are the adapter file's lora_A and lora_B, row-major, float32 or
 * bfloat16 (src_bf16[i]); the pools are float32 or bfloat16 (dst_bf16). The scale is applied in
 * float32 and a bfloat16 result rounded to nearest even, as torch rounds. */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define COLS 64 /* b_src rows transposed per pass: 64 x r values in, r runs of 64 out */

static inline float load(const void *p, int64_t i, int bf16)
{
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float v, int bf16)
{
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static void transpose_scaled(void *const *dst, const void *src, int src_bf16, int dst_bf16, int64_t r,
                             int64_t dout, float scale)
{
    for (int64_t o0 = 0; o0 < dout; o0 += COLS) {
        const int64_t o1 = o0 + COLS < dout ? o0 + COLS : dout;
        for (int64_t j = 0; j < r; j++)
            for (int64_t o = o0; o < o1; o++) store(dst[j], o, scale * load(src, o * r + j, src_bf16), dst_bf16);
    }
}

void hotswap_activate(int64_t items, const void *const *a_src, const void *const *b_src, void *const *a_dst,
                      void *const *b_dst, const int64_t *r, const int64_t *din, const int64_t *dout,
                      const float *scale, const int64_t *const *rows, const int64_t *count, const int64_t *src_bf16,
                      int64_t dst_bf16)
{
    const int64_t elem = dst_bf16 ? 2 : 4;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < items; i++) {
        void *bs[count[i]];
        for (int64_t j = 0; j < count[i]; j++) {
            char *a = (char *)a_dst[i] + rows[i][j] * din[i] * elem;
            bs[j] = (char *)b_dst[i] + rows[i][j] * dout[i] * elem;
            if (j >= r[i]) {
                memset(a, 0, din[i] * elem);
                memset(bs[j], 0, dout[i] * elem);
            } else if (src_bf16[i] == dst_bf16) {
                memcpy(a, (const char *)a_src[i] + j * din[i] * elem, din[i] * elem);
            } else {
                for (int64_t d = 0; d < din[i]; d++)
                    store(a, d, load(a_src[i], j * din[i] + d, (int)src_bf16[i]), (int)dst_bf16);
            }
        }
        transpose_scaled(bs, b_src[i], (int)src_bf16[i], (int)dst_bf16, r[i], dout[i], scale[i]);
    }
}
