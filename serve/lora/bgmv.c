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
 * LoRA to it in the same pass. The pools hold float32 rows, or bfloat16 ones (half the bytes a decode
 * step streams): the kernels that read them are in bgmv_rows.h, compiled once for each. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "bf16.h"

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


/* The engine's entry: one step's row ids (the same in every layer) and one layer's pools, each
 * set up once, so a call from Python passes four pointers. x [T, din] and y [T, ldy], rows contiguous.
 * The pools' rows are float32, or bfloat16 when ``bf16`` is set. */
struct hotswap_lora_step {
    int64_t n, nk, nmod, k;
    const int64_t *rows_a, *rows_b, *tok;
    float *h;
};
struct hotswap_lora_pools {
    int64_t din, ldy;
    const void *a;
    const void *const *b;
    const int64_t *dout;
    int64_t bf16;
};

/* One layer's fused base projection (the modules' weights stacked by rows, as the engine holds them). */
struct hotswap_base {
    int64_t din, nmod;
    const float *w;       /* [sum dout, din] */
    const int64_t *dout;  /* [nmod] */
};

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

#define CONCAT_(a, b) a##b
#define CONCAT(a, b) CONCAT_(a, b)

#define ROW float
#define LOAD8(p) _mm256_loadu_ps(p)
#define TO_F32(v) (v)
#define NAME(f) CONCAT(f, _f32)
#include "bgmv_rows.h"
#undef ROW
#undef LOAD8
#undef TO_F32
#undef NAME

#define ROW uint16_t
/* eight bfloat16 values widened to 32 bits, then shifted into the top half: exact */
#define LOAD8(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define TO_F32(v) bf16_to_f32(v)
#define NAME(f) CONCAT(f, _bf16)
#include "bgmv_rows.h"

int hotswap_lora_layer(const struct hotswap_lora_step *s, const struct hotswap_lora_pools *p, const float *x, float *y)
{
    if (p->bf16)
        return lora_bf16(s->n, p->din, x, p->din, p->a, s->rows_a, s->nk, s->nmod, s->k, (const uint16_t *const *)p->b,
                         s->rows_b, p->dout, y, p->ldy, s->tok, s->h);
    return lora_f32(s->n, p->din, x, p->din, p->a, s->rows_a, s->nk, s->nmod, s->k, (const float *const *)p->b,
                    s->rows_b, p->dout, y, p->ldy, s->tok, s->h);
}

/* A few tokens' base projection, y [T, sum dout] = x [T, din] w^T, plus the step's LoRA when s and p are
 * given (see project in bgmv_rows.h). */
void hotswap_project(int64_t T, const struct hotswap_base *base, const float *x, float *y,
                     const struct hotswap_lora_step *s, const struct hotswap_lora_pools *p)
{
    if (p != NULL && p->bf16)
        project_bf16(T, base, x, y, s, p);
    else
        project_f32(T, base, x, y, s, p);
}
