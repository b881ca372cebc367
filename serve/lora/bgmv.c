/* Batched gather matrix-vector LoRA for decode steps on CPU (the role Punica's BGMV kernel plays on
 * GPUs). Each token reads its own adapter's rows straight from the stacked pools, so a step reads
 * every adapter's A and B once, in one call per fused module group, with no gathered copies.
 *
 * Semantics (i over the n adapter tokens, j over nk = nmod * k rank rows):
 *     h[i, j] = dot(x[tok[i]], a[rows_a[i, j]])
 *     y[tok[i], col_m + o] += sum_{j < k} h[i, m*k + j] * b_m[rows_b[m, i, j], o]
 * where col_m is the sum of dout over the modules before m. Row 0 of every pool holds zeros. */
#include <stdint.h>

#define CHUNK 512 /* output columns one thread takes at a time */
#define TILE 64 /* columns held in registers (8 AVX vectors) */

static float dot(const float *restrict a, const float *restrict b, int64_t n)
{
    /* two 8-wide partial sums: independent FMA chains the compiler vectorizes */
    float v0[8] = {0}, v1[8] = {0}, s = 0.f;
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) {
        for (int u = 0; u < 8; u++) v0[u] += a[d + u] * b[d + u];
        for (int u = 0; u < 8; u++) v1[u] += a[d + 8 + u] * b[d + 8 + u];
    }
    for (; d < n; d++) s += a[d] * b[d];
    for (int u = 0; u < 8; u++) s += v0[u] + v1[u];
    return s;
}

/* out[r] = dot(x, a[rows[r]]) for r < 4, the four rows read side by side */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static void dot4(const float *restrict x, const float *restrict a, const int64_t *rows, int64_t n, float *out)
{
    const float *r0 = a + rows[0] * n, *r1 = a + rows[1] * n, *r2 = a + rows[2] * n, *r3 = a + rows[3] * n;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) {
        const __m256 xv = _mm256_loadu_ps(x + d);
        s0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r0 + d), s0);
        s1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r1 + d), s1);
        s2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r2 + d), s2);
        s3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r3 + d), s3);
    }
    float t0 = hsum(s0), t1 = hsum(s1), t2 = hsum(s2), t3 = hsum(s3);
    for (; d < n; d++) {
        t0 += x[d] * r0[d]; t1 += x[d] * r1[d]; t2 += x[d] * r2[d]; t3 += x[d] * r3[d];
    }
    out[0] = t0; out[1] = t1; out[2] = t2; out[3] = t3;
}
#else
static void dot4(const float *restrict x, const float *restrict a, const int64_t *rows, int64_t n, float *out)
{
    for (int r = 0; r < 4; r++) out[r] = dot(x, a + rows[r] * n, n);
}
#endif

/* yr[0:TILE] += sum_j h[j] * rows[j][off:off+TILE], the tile held in registers across the k rows
   (written with intrinsics: left to itself, gcc vectorizes across the rows with gathers) */
#if defined(__AVX2__) && defined(__FMA__)
static void tile_full(float *restrict yr, const float *const *restrict rows, int64_t off, const float *restrict h,
                      int64_t k)
{
    __m256 acc[TILE / 8];
    for (int u = 0; u < TILE / 8; u++) acc[u] = _mm256_loadu_ps(yr + 8 * u);
    for (int64_t j = 0; j < k; j++) {
        const __m256 hj = _mm256_set1_ps(h[j]);
        const float *r = rows[j] + off;
        for (int u = 0; u < TILE / 8; u++) acc[u] = _mm256_fmadd_ps(hj, _mm256_loadu_ps(r + 8 * u), acc[u]);
    }
    for (int u = 0; u < TILE / 8; u++) _mm256_storeu_ps(yr + 8 * u, acc[u]);
}
#else
static void tile_part(float *restrict yr, const float *const *restrict rows, int64_t off, const float *restrict h,
                      int64_t k, int64_t w);
static void tile_full(float *restrict yr, const float *const *restrict rows, int64_t off, const float *restrict h,
                      int64_t k)
{
    tile_part(yr, rows, off, h, k, TILE);
}
#endif

static void tile_part(float *restrict yr, const float *const *restrict rows, int64_t off, const float *restrict h,
                      int64_t k, int64_t w)
{
    for (int64_t j = 0; j < k; j++) {
        const float hj = h[j], *restrict r = rows[j] + off;
        for (int64_t o = 0; o < w; o++) yr[o] += hj * r[o];
    }
}

/* y[tok[i], col_m + o] += sum_{j < k} h[i, m*k + j] * b_m[rows_b[m, i, j], o]; inside a parallel region */
static void expand(int64_t n, int64_t nk, const float *h, int64_t nmod, int64_t k, const float *const *b,
                   const int64_t *rows_b, const int64_t *dout, float *y, int64_t ldy, const int64_t *tok)
{
    int64_t col = 0;
    for (int64_t m = 0; m < nmod; m++) {
        const int64_t out = dout[m], chunks = (out + CHUNK - 1) / CHUNK;
        const float *bm = b[m];
#pragma omp for schedule(static) nowait
        for (int64_t ic = 0; ic < n * chunks; ic++) {
            const int64_t i = ic / chunks, c0 = (ic % chunks) * CHUNK;
            const int64_t w = out - c0 < CHUNK ? out - c0 : CHUNK;
            float *yr = y + (tok ? tok[i] : i) * ldy + col + c0;
            const float *hi = h + i * nk + m * k;
            const int64_t *ri = rows_b + (m * n + i) * k;
            const float *rows[k]; /* this token's B rows, from column c0 */
            for (int64_t j = 0; j < k; j++) rows[j] = bm + ri[j] * out + c0;
            int64_t o = 0;
            for (; o + TILE <= w; o += TILE) tile_full(yr + o, rows, o, hi, k);
            if (o < w) tile_part(yr + o, rows, o, hi, k, w - o);
        }
        col += out; /* nowait: modules write disjoint columns */
    }
}

/* shrink then expand (decode steps) */
void hotswap_bgmv(int64_t n, int64_t din, const float *x, int64_t ldx,
                  const float *a, const int64_t *rows_a, int64_t nk,
                  int64_t nmod, int64_t k, const float *const *b, const int64_t *rows_b,
                  const int64_t *dout, float *y, int64_t ldy, const int64_t *tok, float *h)
{
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const float *xr = x + (tok ? tok[i] : i) * ldx;
            int64_t j = 0;
            for (; j + 4 <= nk; j += 4) /* four rows at once: four memory streams in flight */
                dot4(xr, a, rows_a + i * nk + j, din, h + i * nk + j);
            for (; j < nk; j++) h[i * nk + j] = dot(xr, a + rows_a[i * nk + j] * din, din);
        }
        expand(n, nk, h, nmod, k, b, rows_b, dout, y, ldy, tok);
    }
}

/* expand alone, h given (prefill: the shrink is a batched GEMM there, the expand adds in place) */
void hotswap_bgmv_expand(int64_t n, int64_t nk, const float *h, int64_t nmod, int64_t k, const float *const *b,
                         const int64_t *rows_b, const int64_t *dout, float *y, int64_t ldy, const int64_t *tok)
{
#pragma omp parallel
    expand(n, nk, h, nmod, k, b, rows_b, dout, y, ldy, tok);
}
