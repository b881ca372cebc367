/* Batched LoRA for CPU steps, straight from the stacked pools (the role Punica's BGMV and SGMV
 * kernels play on GPUs): each adapter token reads its own adapter's rows, with no gathered copies,
 * in one call per fused module group. Decode steps (one token per sequence) stream every row once;
 * prefill runs of tokens sharing an adapter reuse each row across up to BLOCK tokens.
 *
 * Semantics (i over the n adapter tokens, j over nk = nmod * k rank rows):
 *     h[i, j] = dot(x[tok[i]], a[rows_a[i, j]])
 *     y[tok[i], col_m + o] += sum_{j < k} h[i, m*k + j] * b_m[rows_b[m, i, j], o]
 * where col_m is the sum of dout over the modules before m. Row 0 of every pool holds zeros.
 * hotswap_project (at the end) computes a decode step's base projection, y = x w^T, and adds the same
 * LoRA to it in the same pass. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define BLOCK 4    /* tokens of one adapter that share each row read (prefill) */
#define TILE 16    /* output columns a block holds in registers (two AVX vectors per token) */
#define CHUNK 512  /* output columns per work item when a step has too few blocks for the threads */
#define INLINE static inline __attribute__((always_inline))
#define PREFETCH_PAIRS 2  /* weight row pairs ahead that the projection asks the memory for (see project_tile) */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VEC 1
/* Keeps a loaded vector in a register. Without it GCC folds the load into every FMA that uses the
   vector: the projection tile (2 rows x 4 tokens) issued 16 loads per 8 FMAs, twice what the load
   ports sustain, and ran at a third of the FMA units' rate even on data in L2. */
#define IN_REGISTER(v) __asm__("" : "+x"(v))
static float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

/* h[t * ldh + j] = dot(x_t, row j) for tb tokens and rows j0 <= j < j1 (each row read once for all tb) */
INLINE void shrink_block(const float *const *xs, int tb, const float *a, const int64_t *rows, int64_t j0,
                         int64_t j1, int64_t din, float *h, int64_t ldh)
{
    for (int64_t j = j0; j < j1; j++) {
        const float *r = a + rows[j] * din;
        float s[BLOCK];
        int64_t d = 0;
#ifdef VEC
        __m256 acc[BLOCK][2];
        for (int t = 0; t < tb; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (; d + 16 <= din; d += 16) { /* two chains per token: FMA latency overlaps */
            const __m256 r0 = _mm256_loadu_ps(r + d), r1 = _mm256_loadu_ps(r + d + 8);
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
            for (int t = 0; t < tb; t++) s[t] += xs[t][d] * r[d];
        for (int t = 0; t < tb; t++) h[t * ldh + j] = s[t];
    }
}

/* y[o] += sum_{j<k} h[j] * rows[j][o] for o < w, streaming the rows in memory order four at a time,
   y held in L1 (one token: every row is read once, so the read order is what counts) */
static void expand_rows(float *restrict y, const float *const *rows, const float *h, int64_t k, int64_t w)
{
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
        const float *restrict r0 = rows[j], *restrict r1 = rows[j + 1], *restrict r2 = rows[j + 2],
                    *restrict r3 = rows[j + 3];
        const float h0 = h[j], h1 = h[j + 1], h2 = h[j + 2], h3 = h[j + 3];
        int64_t o = 0;
#ifdef VEC
        const __m256 v0 = _mm256_set1_ps(h0), v1 = _mm256_set1_ps(h1), v2 = _mm256_set1_ps(h2),
                     v3 = _mm256_set1_ps(h3);
        for (; o + 8 <= w; o += 8) {
            __m256 acc = _mm256_loadu_ps(y + o);
            acc = _mm256_fmadd_ps(v0, _mm256_loadu_ps(r0 + o), acc);
            acc = _mm256_fmadd_ps(v1, _mm256_loadu_ps(r1 + o), acc);
            acc = _mm256_fmadd_ps(v2, _mm256_loadu_ps(r2 + o), acc);
            acc = _mm256_fmadd_ps(v3, _mm256_loadu_ps(r3 + o), acc);
            _mm256_storeu_ps(y + o, acc);
        }
#endif
        for (; o < w; o++) y[o] += h0 * r0[o] + h1 * r1[o] + h2 * r2[o] + h3 * r3[o];
    }
    for (; j < k; j++)
        for (int64_t o = 0; o < w; o++) y[o] += h[j] * rows[j][o];
}

/* ys[t][o] += sum_{j<k} h[t * ldh + j] * rows[j][o] for tb tokens sharing the rows: column tiles held
   in registers for all tb tokens while the k rows stream past, so each row load feeds tb FMAs */
INLINE void expand_block(float *const *ys, int tb, const float *const *rows, const float *h, int64_t ldh,
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
            const __m256 b0 = _mm256_loadu_ps(rows[j] + o), b1 = _mm256_loadu_ps(rows[j] + o + 8);
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
            for (int64_t j = 0; j < k; j++) s += h[t * ldh + j] * rows[j][o];
            ys[t][o] = s;
        }
}

/* The step's tokens cut into blocks: consecutive tokens with the same rows (one sequence's run in a
   prefill), at most BLOCK per block. Returns the number of blocks; start[b] is block b's first token. */
static int64_t make_blocks(int64_t n, const int64_t *rows_a, int64_t nk, int64_t *start)
{
    int64_t nb = 0;
    for (int64_t i = 0; i < n; i++) {
        const int same = i > 0 && i - start[nb - 1] < BLOCK &&
                         memcmp(rows_a + i * nk, rows_a + (i - 1) * nk, nk * sizeof(int64_t)) == 0;
        if (!same) start[nb++] = i;
    }
    start[nb] = n;
    return nb;
}

/* Returns 0, or -1 when memory for the block list ran out (y untouched).
   Work split: phase 1 items are (block, group of 16 rows), phase 2 items (block, module, column
   chunk); chunks only cut rows when there are too few blocks to keep every thread busy. */
int hotswap_lora(int64_t n, int64_t din, const float *x, int64_t ldx, const float *a, const int64_t *rows_a,
                  int64_t nk, int64_t nmod, int64_t k, const float *const *b, const int64_t *rows_b,
                  const int64_t *dout, float *y, int64_t ldy, const int64_t *tok, float *h)
{
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
            case 1: shrink_block(xs, 1, a, rows, j0, j1, din, h + i0 * nk, nk); break;
            case 2: shrink_block(xs, 2, a, rows, j0, j1, din, h + i0 * nk, nk); break;
            case 3: shrink_block(xs, 3, a, rows, j0, j1, din, h + i0 * nk, nk); break;
            default: shrink_block(xs, 4, a, rows, j0, j1, din, h + i0 * nk, nk); break;
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
            const float *rows[k];
            for (int64_t j = 0; j < k; j++) rows[j] = b[m] + rows_b[(m * n + i0) * k + j] * out + c0;
            float *ys[BLOCK];
            for (int t = 0; t < tb; t++) ys[t] = y + (tok ? tok[i0 + t] : i0 + t) * ldy + col + c0;
            const float *hb = h + i0 * nk + m * k;
            switch (tb) {
            case 1: expand_rows(ys[0], rows, hb, k, w); break;
            case 2: expand_block(ys, 2, rows, hb, nk, k, w); break;
            case 3: expand_block(ys, 3, rows, hb, nk, k, w); break;
            default: expand_block(ys, 4, rows, hb, nk, k, w); break;
            }
        }
    }
    free(start);
    return 0;
}

/* The engine's entry: one step's row ids (the same in every layer) and one layer's pools, each
 * set up once, so a call from Python passes four pointers. x [T, din] and y [T, ldy], rows contiguous. */
struct hotswap_lora_step {
    int64_t n, nk, nmod, k;
    const int64_t *rows_a, *rows_b, *tok;
    float *h;
};
struct hotswap_lora_pools {
    int64_t din, ldy;
    const float *a;
    const float *const *b;
    const int64_t *dout;
};

int hotswap_lora_layer(const struct hotswap_lora_step *s, const struct hotswap_lora_pools *p, const float *x, float *y)
{
    return hotswap_lora(s->n, p->din, x, p->din, p->a, s->rows_a, s->nk, s->nmod, s->k, p->b, s->rows_b, p->dout, y,
                        p->ldy, s->tok, s->h);
}

/* s0[t] = dot(w0, x_t), s1[t] = dot(w1, x_t) for tb tokens: two weight rows and tb tokens held in
 * registers, so each weight load feeds 2 * tb FMAs (x stays in L1). Inlined per block size: compiled for a
 * run-time tb, the inner loop tested tb and reloaded its pointers every 8 floats, and ran 10 to 20% slower.
 * With `ahead` (the first pass over a row pair), it also prefetches the same cache lines of the rows
 * PREFETCH_PAIRS pairs further on: at 8 tokens the tile computes long enough per row that the hardware
 * prefetcher lets the next rows' loads wait, and a step's projections ran at half the memory's rate. */
INLINE void project_tile(int tb, int ahead, int64_t din, const float *x, const float *w0, const float *w1,
                         float *s0, float *s1)
{
    int64_t d = 0;
    for (int t = 0; t < tb; t++) s0[t] = s1[t] = 0.f;
#ifdef VEC
    __m256 a0[4], a1[4];
    const int64_t distance = PREFETCH_PAIRS * 2 * din;  /* prefetching past the weights' end never faults */
    for (int t = 0; t < tb; t++) a0[t] = a1[t] = _mm256_setzero_ps();
    for (; d + 8 <= din; d += 8) {
        if (ahead && d % 16 == 0) { /* one 64-byte line of each row */
            __builtin_prefetch(w0 + d + distance, 0, 3);
            __builtin_prefetch(w1 + d + distance, 0, 3);
        }
        __m256 v0 = _mm256_loadu_ps(w0 + d), v1 = _mm256_loadu_ps(w1 + d);
        IN_REGISTER(v0);
        IN_REGISTER(v1);
        for (int t = 0; t < tb; t++) {
            __m256 xv = _mm256_loadu_ps(x + t * din + d);
            IN_REGISTER(xv);
            a0[t] = _mm256_fmadd_ps(v0, xv, a0[t]);
            a1[t] = _mm256_fmadd_ps(v1, xv, a1[t]);
        }
    }
    for (int t = 0; t < tb; t++) s0[t] = hsum(a0[t]), s1[t] = hsum(a1[t]);
#endif
    for (; d < din; d++)
        for (int t = 0; t < tb; t++) {
            s0[t] += w0[d] * x[t * din + d];
            s1[t] += w1[d] * x[t * din + d];
        }
}

/* y[t * ldy + o] = dot(w[o], x[t]) for o0 <= o < o1 and t < T, two weight rows and four tokens at a time */
static void project_rows(int64_t T, int64_t din, const float *x, const float *w, int64_t o0, int64_t o1, float *y,
                         int64_t ldy)
{
    for (int64_t o = o0; o < o1; o += 2) {
        const int two = o + 1 < o1;
        const float *w0 = w + o * din, *w1 = two ? w0 + din : w0;
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
            const int tb = T - t0 < 4 ? (int)(T - t0) : 4;
            const float *xt = x + t0 * din;
            float s0[4], s1[4];
            switch (tb) {
            case 1: project_tile(1, t0 == 0, din, xt, w0, w1, s0, s1); break;
            case 2: project_tile(2, t0 == 0, din, xt, w0, w1, s0, s1); break;
            case 3: project_tile(3, t0 == 0, din, xt, w0, w1, s0, s1); break;
            default: project_tile(4, t0 == 0, din, xt, w0, w1, s0, s1); break;
            }
            for (int t = 0; t < tb; t++) {
                y[(t0 + t) * ldy + o] = s0[t];
                if (two) y[(t0 + t) * ldy + o + 1] = s1[t];
            }
        }
    }
}

/* One layer's fused base projection (the modules' weights stacked by rows, as the engine holds them). */
struct hotswap_base {
    int64_t din, nmod;
    const float *w;       /* [sum dout, din] */
    const int64_t *dout;  /* [nmod] */
};

/* A few tokens' base projection, y [T, sum dout] = x [T, din] w^T, and, when s and p are given, the
 * step's LoRA added in the same parallel region (s and p as for hotswap_lora_layer, with the same
 * modules as the base): the rank activations first, then each thread takes a slice of every module's
 * outputs, computes it and adds the adapter tokens' rows to that slice while it sits in L1. Decode
 * steps need this: their matmuls stream the weights once for all tokens, and a separate LoRA call per
 * group would pay the parallel region's start and a cold trip through the caches once more. */
void hotswap_project(int64_t T, const struct hotswap_base *base, const float *x, float *y,
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
            shrink_block(xs, 1, p->a, s->rows_a + i * nk, j0, j1, din, s->h + i * nk, nk);
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
                const float *rows[k];
                for (int64_t j = 0; j < k; j++) rows[j] = p->b[m] + s->rows_b[(m * n + i) * k + j] * out + c0;
                expand_rows(y + (s->tok ? s->tok[i] : i) * total + col + c0, rows, s->h + i * nk + m * k, k, w);
            }
        }
    }
}
