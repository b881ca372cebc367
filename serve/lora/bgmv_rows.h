/* The kernels that read adapter rows, for one element type of the pools: bgmv.c includes this file
 * once per type, with ROW (the element), LOAD8 (eight of them as floats in a vector), TO_F32 (one as a
 * float) and NAME (the variant's function names) defined. Every sum is in float32 either way, in the
 * same order, so a pool of bfloat16 rows computes what a float32 pool holding the same values does. */

/* h[t * ldh + j] = dot(x_t, row j) for tb tokens and rows j0 <= j < j1 (each row read once for all tb) */
INLINE void NAME(shrink_block)(const float *const *xs, int tb, const ROW *a, const int64_t *rows, int64_t j0,
                               int64_t j1, int64_t din, float *h, int64_t ldh)
{
    for (int64_t j = j0; j < j1; j++) {
        const ROW *r = a + rows[j] * din;
        float s[BLOCK];
        int64_t d = 0;
#ifdef VEC
        __m256 acc[BLOCK][2];
        for (int t = 0; t < tb; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (; d + 16 <= din; d += 16) { /* two chains per token: FMA latency overlaps */
            const __m256 r0 = LOAD8(r + d), r1 = LOAD8(r + d + 8);
            for (int t = 0; t < tb; t++) {
                acc[t][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[t] + d), r0, acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[t] + d + 8), r1, acc[t][1]);
            }
        }
        for (int t = 0; t < tb; t++) s[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
#else
        for (int t = 0; t < tb; t++) s[t] = 0.f;
#endif
        for (; d < din; d++)
            for (int t = 0; t < tb; t++) s[t] += xs[t][d] * TO_F32(r[d]);
        for (int t = 0; t < tb; t++) h[t * ldh + j] = s[t];
    }
}

/* y[o] += sum_{j<k} h[j] * rows[j][o] for o < w, streaming the rows in memory order four at a time,
   y held in L1 (one token: every row is read once, so the read order is what counts) */
static void NAME(expand_rows)(float *restrict y, const ROW *const *rows, const float *h, int64_t k, int64_t w)
{
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
        const ROW *restrict r0 = rows[j], *restrict r1 = rows[j + 1], *restrict r2 = rows[j + 2],
                    *restrict r3 = rows[j + 3];
        const float h0 = h[j], h1 = h[j + 1], h2 = h[j + 2], h3 = h[j + 3];
        int64_t o = 0;
#ifdef VEC
        const __m256 v0 = _mm256_set1_ps(h0), v1 = _mm256_set1_ps(h1), v2 = _mm256_set1_ps(h2),
                     v3 = _mm256_set1_ps(h3);
        for (; o + 8 <= w; o += 8) {
            __m256 acc = _mm256_loadu_ps(y + o);
            acc = _mm256_fmadd_ps(v0, LOAD8(r0 + o), acc);
            acc = _mm256_fmadd_ps(v1, LOAD8(r1 + o), acc);
            acc = _mm256_fmadd_ps(v2, LOAD8(r2 + o), acc);
            acc = _mm256_fmadd_ps(v3, LOAD8(r3 + o), acc);
            _mm256_storeu_ps(y + o, acc);
        }
#endif
        for (; o < w; o++) y[o] += h0 * TO_F32(r0[o]) + h1 * TO_F32(r1[o]) + h2 * TO_F32(r2[o]) + h3 * TO_F32(r3[o]);
    }
    for (; j < k; j++)
        for (int64_t o = 0; o < w; o++) y[o] += h[j] * TO_F32(rows[j][o]);
}

/* ys[t][o] += sum_{j<k} h[t * ldh + j] * rows[j][o] for tb tokens sharing the rows: column tiles held
   in registers for all tb tokens while the k rows stream past, so each row load feeds tb FMAs */
INLINE void NAME(expand_block)(float *const *ys, int tb, const ROW *const *rows, const float *h, int64_t ldh,
                               int64_t k, int64_t w)
{
    int64_t o = 0;
#ifdef VEC
    for (; o + TILE <= w; o += TILE) {
        __m256 acc[BLOCK][2];
        for (int t = 0; t < tb; t++) {
            acc[t][0] = _mm256_loadu_ps(ys[t] + o);
            acc[t][1] = _mm256_loadu_ps(ys[t] + o + 8);
        }
        for (int64_t j = 0; j < k; j++) {
            const __m256 b0 = LOAD8(rows[j] + o), b1 = LOAD8(rows[j] + o + 8);
            for (int t = 0; t < tb; t++) {
                const __m256 hv = _mm256_broadcast_ss(h + t * ldh + j);
                acc[t][0] = _mm256_fmadd_ps(hv, b0, acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(hv, b1, acc[t][1]);
            }
        }
        for (int t = 0; t < tb; t++) {
            _mm256_storeu_ps(ys[t] + o, acc[t][0]);
            _mm256_storeu_ps(ys[t] + o + 8, acc[t][1]);
        }
    }
#endif
    for (; o < w; o++)
        for (int t = 0; t < tb; t++) {
            float s = ys[t][o];
            for (int64_t j = 0; j < k; j++) s += h[t * ldh + j] * TO_F32(rows[j][o]);
            ys[t][o] = s;
        }
}

/* Returns 0, or -1 when memory for the block list ran out (y untouched).
   Work split: phase 1 items are (block, group of 16 rows), phase 2 items (block, module, column
   chunk); chunks only cut rows when there are too few blocks to keep every thread busy. */
static int NAME(lora)(int64_t n, int64_t din, const float *x, int64_t ldx, const ROW *a, const int64_t *rows_a,
                      int64_t nk, int64_t nmod, int64_t k, const ROW *const *b, const int64_t *rows_b,
                      const int64_t *dout, float *y, int64_t ldy, const int64_t *tok, float *h)
{
    if (n == 0) return 0; /* no token: nothing to add (and no block to split the work by) */
    int64_t *start = malloc((n + 1) * sizeof(int64_t));
    if (start == NULL) return -1;
    const int64_t nb = make_blocks(n, rows_a, nk, start);
    const int64_t groups = (nk + 15) / 16, threads = omp_get_max_threads();
    int64_t total = 0, cut = CHUNK;
    for (int64_t m = 0; m < nmod; m++) total += dout[m];
    if (nb < 2 * threads) { /* few tokens (a lone decode): split columns instead */
        const int64_t want = (2 * threads + nb - 1) / nb;
        cut = (total / want + 63) / 64 * 64;
        if (cut < 64) cut = 64;
    }
    int64_t chunks = 0;
    for (int64_t m = 0; m < nmod; m++) chunks += (dout[m] + cut - 1) / cut;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nb * groups; item++) {
            const int64_t blk = item / groups, g = item % groups, i0 = start[blk];
            const int tb = (int)(start[blk + 1] - i0);
            const float *xs[BLOCK];
            for (int t = 0; t < tb; t++) xs[t] = x + (tok ? tok[i0 + t] : i0 + t) * ldx;
            const int64_t j0 = g * 16, j1 = j0 + 16 < nk ? j0 + 16 : nk;
            const int64_t *rows = rows_a + i0 * nk;
            switch (tb) { /* each block size compiled on its own: accumulators stay in registers */
            case 1: NAME(shrink_block)(xs, 1, a, rows, j0, j1, din, h + i0 * nk, nk); break;
            case 2: NAME(shrink_block)(xs, 2, a, rows, j0, j1, din, h + i0 * nk, nk); break;
            case 3: NAME(shrink_block)(xs, 3, a, rows, j0, j1, din, h + i0 * nk, nk); break;
            default: NAME(shrink_block)(xs, 4, a, rows, j0, j1, din, h + i0 * nk, nk); break;
            }
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nb * chunks; item++) {
            const int64_t blk = item / chunks, i0 = start[blk];
            const int tb = (int)(start[blk + 1] - i0);
            int64_t c = item % chunks, m = 0, col = 0;
            while (c >= (dout[m] + cut - 1) / cut) { /* which module, which chunk of it */
                c -= (dout[m] + cut - 1) / cut;
                col += dout[m++];
            }
            const int64_t out = dout[m], c0 = c * cut, w = out - c0 < cut ? out - c0 : cut;
            const ROW *rows[k];
            for (int64_t j = 0; j < k; j++) rows[j] = b[m] + rows_b[(m * n + i0) * k + j] * out + c0;
            float *ys[BLOCK];
            for (int t = 0; t < tb; t++) ys[t] = y + (tok ? tok[i0 + t] : i0 + t) * ldy + col + c0;
            const float *hb = h + i0 * nk + m * k;
            switch (tb) {
            case 1: NAME(expand_rows)(ys[0], rows, hb, k, w); break;
            case 2: NAME(expand_block)(ys, 2, rows, hb, nk, k, w); break;
            case 3: NAME(expand_block)(ys, 3, rows, hb, nk, k, w); break;
            default: NAME(expand_block)(ys, 4, rows, hb, nk, k, w); break;
            }
        }
    }
    free(start);
    return 0;
}

/* A few tokens' base projection, y [T, sum dout] = x [T, din] w^T, and, when s and p are given, the
 * step's LoRA added in the same parallel region (s and p as for hotswap_lora_layer, with the same
 * modules as the base): the rank activations first, then each thread takes a slice of every module's
 * outputs, computes it and adds the adapter tokens' rows to that slice while it sits in L1. Decode
 * steps need this: their matmuls stream the weights once for all tokens, and a separate LoRA call per
 * group would pay the parallel region's start and a cold trip through the caches once more. */
static void NAME(project)(int64_t T, const struct hotswap_base *base, const float *x, float *y,
                          const struct hotswap_lora_step *s, const struct hotswap_lora_pools *p)
{
    const int64_t din = base->din, nmod = base->nmod, threads = omp_get_max_threads();
    int64_t total = 0;
    for (int64_t m = 0; m < nmod; m++) total += base->dout[m];
    const int64_t n = s ? s->n : 0, nk = s ? s->nk : 0, k = s ? s->k : 0, groups = (nk + 15) / 16;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < n * groups; item++) {
            const int64_t i = item / groups, j0 = item % groups * 16, j1 = j0 + 16 < nk ? j0 + 16 : nk;
            const float *xs[1] = {x + (s->tok ? s->tok[i] : i) * din};
            NAME(shrink_block)(xs, 1, (const ROW *)p->a, s->rows_a + i * nk, j0, j1, din, s->h + i * nk, nk);
        }
        /* item = (module, slice): with static round-robin each thread gets one slice of every module */
#pragma omp for schedule(static, 1)
        for (int64_t item = 0; item < nmod * threads; item++) {
            const int64_t m = item / threads, part = item % threads, out = base->dout[m];
            const int64_t per = ((out + threads - 1) / threads + 7) / 8 * 8, c0 = part * per;
            if (c0 >= out) continue;
            const int64_t w = out - c0 < per ? out - c0 : per;
            int64_t col = 0;
            for (int64_t q = 0; q < m; q++) col += base->dout[q];
            project_rows(T, din, x, base->w, col + c0, col + c0 + w, y, total);
            for (int64_t i = 0; i < n; i++) {
                const ROW *rows[k];
                for (int64_t j = 0; j < k; j++)
                    rows[j] = (const ROW *)p->b[m] + s->rows_b[(m * n + i) * k + j] * out + c0;
                NAME(expand_rows)(y + (s->tok ? s->tok[i] : i) * total + col + c0, rows, s->h + i * nk + m * k, k, w);
            }
        }
    }
}
