/* asyncspade's CPU kernels for the decode step: the few places where torch's per-op overhead or memory traffic
 * stands between a decode step and the bytes it must read.
 *
 *   attend        flash-decoding attention of G query heads per KV head over a position range [begin, end) of the
 *                 KV store, or over a list of positions (sparse): K/V rows are read once, straight from the store
 *                 (no gather copy), the sequence is split into chunks spread over the threads, partial softmax
 *                 states are merged at the end.
 *   score         aggregated attention probability of every candidate key (selection): per-head softmax over the
 *                 candidates, summed (or max) over the heads of a group.
 *   qkv_post      after the fused QKV projection: bias, Qwen3's q/k RMSNorm, RoPE; writes K/V rows into the store
 *                 and the rotated queries (fp32) for attention.
 *   add_rmsnorm   h += delta; out = rmsnorm(h) * w  (the residual add fused with the next norm).
 *   silu_mul      out = silu(gate) * up from the fused gate/up projection.
 *
 * Storage dtypes: KV store bf16 or fp32; activations in/out bf16 or fp32 (flags). Built at first use with the
 * machine's own compiler flags (-march=native), OpenMP from the same libgomp torch loaded (one thread pool).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef uint16_t bf16;

static inline float bf2f(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) {          /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

typedef uint16_t f16;

static inline float h2f(f16 h) {            /* IEEE half -> float (int4 scales) */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0x1fu) u = sign | 0x7f800000u | (m << 13);                 /* inf, nan */
    else if (e) u = sign | ((e + 112u) << 23) | (m << 13);              /* normal */
    else if (!m) u = sign;                                               /* zero */
    else {                                                               /* subnormal: normalise */
        int sh = 0;
        while (!(m & 0x400u)) { m <<= 1; sh++; }
        u = sign | ((uint32_t)(113 - sh) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void load_row(const void *base, int bf, int64_t off, int n, float *dst) {
    if (bf) {
        const bf16 *s = (const bf16 *)base + off;
        for (int i = 0; i < n; i++) dst[i] = bf2f(s[i]);
    } else {
        memcpy(dst, (const float *)base + off, (size_t)n * 4);
    }
}

static inline void store_row(void *base, int bf, int64_t off, int n, const float *src) {
    if (bf) {
        bf16 *d = (bf16 *)base + off;
        for (int i = 0; i < n; i++) d[i] = f2bf(src[i]);
    } else {
        memcpy((float *)base + off, src, (size_t)n * 4);
    }
}

#define MAXG 32       /* query heads per KV head */
#define MAXD 256      /* head dim */

/* ------------------------------------------------------------------------------------------------ dot products */

#define BLOCK 16      /* positions scored at once: one vector of scores per query head */

/* A run of positions: pos[0..n) if pos, else begin + [0, n); with pos, entries masked by valid or outside
 * [lim_lo, lim_hi) are skipped. */
typedef struct { const int64_t *pos; const uint8_t *valid; int64_t begin, n, lim_lo, lim_hi; } run_t;

/* Row offset of entry j of a run, and whether it is attended (masked entries read row 0: always valid memory). */
static inline int run_row(const run_t *r, int64_t j, int D, int64_t *off) {
    if (!r->pos) { *off = (r->begin + j) * D; return 1; }
    int64_t p = r->pos[j];
    int ok = (!r->valid || r->valid[j]) && p >= r->lim_lo && p < r->lim_hi;
    *off = ok ? p * D : 0;
    return ok;
}

/* s[g * BLOCK + j] = q_g . K[p_j] for the nb <= BLOCK rows at rowoff[j] (element offsets into K). */
#ifdef __AVX512F__
#include <immintrin.h>

static inline __m512 ld16(const void *base, int bf, int64_t off) {
    if (bf) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const bf16 *)base + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + off);
}

/* r[j] = sum of the lanes of v[j], j < 16 (a transpose-reduce: 15 adds instead of 16 horizontal sums). */
static inline __m512 hsum16(__m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
        b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

static void dots(const float *q, const void *K, int bf, const int64_t *rowoff, int nb, int G, int D, float *s) {
    int DV = D / 16;
    __m512 part[16];
    for (int g = 0; g < G; g++) {
        const float *qg = q + g * D;
        for (int j = 0; j < BLOCK; j++) {
            if (j >= nb) { part[j] = _mm512_setzero_ps(); continue; }
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), ld16(K, bf, rowoff[j]));
            for (int v = 1; v < DV; v++)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), ld16(K, bf, rowoff[j] + 16 * v), acc);
            part[j] = acc;
        }
        _mm512_storeu_ps(s + g * BLOCK, hsum16(part));
    }
}

static inline int vec_ok(int D) { return D % 16 == 0; }

/* exp(x) for 16 lanes: 2^(x log2 e) = 2^n * 2^f, |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative
 * error ~1e-7); lanes in ``zero`` (masked scores) give exactly 0. */
static inline __m512 exp512(__m512 x, __mmask16 zero) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950409f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471806f));
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_maskz_mov_ps((__mmask16)~zero, _mm512_scalef_ps(p, n));
}

#define MAXDV 16

/* Block dot products with G and D known at compile time (each K row converted once): s[g * BLOCK + j]. */
#define DEF_DOTS(NAME, GG, DVV)                                                                                 \
static inline __attribute__((always_inline)) void NAME(const float *q, const void *K, int bf,                  \
                                                      const int64_t *rowoff, int nb, float *s) {               \
    enum { G = GG, DV = DVV, D = 16 * DVV };                                                                   \
    __m512 qv[G][DV], part[G][BLOCK];                                                                          \
    for (int g = 0; g < G; g++)                                                                                \
        for (int v = 0; v < DV; v++) qv[g][v] = _mm512_loadu_ps(q + g * D + 16 * v);                           \
    for (int j = 0; j < BLOCK; j++) {                                                                          \
        if (j >= nb) { for (int g = 0; g < G; g++) part[g][j] = _mm512_setzero_ps(); continue; }                \
        __m512 kr[DV];                                                                                         \
        for (int v = 0; v < DV; v++) kr[v] = ld16(K, bf, rowoff[j] + 16 * v);                                  \
        for (int g = 0; g < G; g++) {                                                                          \
            __m512 t = _mm512_mul_ps(qv[g][0], kr[0]);                                                         \
            for (int v = 1; v < DV; v++) t = _mm512_fmadd_ps(qv[g][v], kr[v], t);                              \
            part[g][j] = t;                                                                                    \
        }                                                                                                      \
    }                                                                                                          \
    for (int g = 0; g < G; g++) _mm512_storeu_ps(s + g * BLOCK, hsum16(part[g]));                              \
}

DEF_DOTS(dots_g1_d64, 1, 4)
DEF_DOTS(dots_g2_d64, 2, 4)
DEF_DOTS(dots_g3_d64, 3, 4)
DEF_DOTS(dots_g4_d64, 4, 4)
DEF_DOTS(dots_g1_d128, 1, 8)
DEF_DOTS(dots_g2_d128, 2, 8)
DEF_DOTS(dots_g3_d128, 3, 8)
DEF_DOTS(dots_g4_d128, 4, 8)

/* Quest's page bound for all G query heads at once, G and D known at compile time: each page's min/max rows are
 * converted once, and max(q mn, q mx) = q+ mx + q- mn (mx >= mn) is two FMAs per 16 channels. */
#define DEF_BOUND_DOTS(NAME, GG, DVV)                                                                           \
static inline __attribute__((always_inline)) void NAME(const float *q, const void *mn, const void *mx, int bf,  \
                                                      const int64_t *rowoff, int nb, float *s) {               \
    enum { G = GG, DV = DVV, D = 16 * DVV };                                                                   \
    __m512 qp[G][DV], qn[G][DV], part[G][BLOCK];                                                               \
    for (int g = 0; g < G; g++)                                                                                \
        for (int v = 0; v < DV; v++) {                                                                         \
            __m512 x = _mm512_loadu_ps(q + g * D + 16 * v);                                                    \
            qp[g][v] = _mm512_max_ps(x, _mm512_setzero_ps());                                                  \
            qn[g][v] = _mm512_min_ps(x, _mm512_setzero_ps());                                                  \
        }                                                                                                      \
    for (int j = 0; j < BLOCK; j++) {                                                                          \
        if (j >= nb) { for (int g = 0; g < G; g++) part[g][j] = _mm512_setzero_ps(); continue; }                \
        __m512 lo[DV], hi[DV];                                                                                 \
        for (int v = 0; v < DV; v++) {                                                                         \
            lo[v] = ld16(mn, bf, rowoff[j] + 16 * v);                                                          \
            hi[v] = ld16(mx, bf, rowoff[j] + 16 * v);                                                          \
        }                                                                                                      \
        for (int g = 0; g < G; g++) {                                                                          \
            __m512 t = _mm512_mul_ps(qp[g][0], hi[0]);                                                         \
            t = _mm512_fmadd_ps(qn[g][0], lo[0], t);                                                           \
            for (int v = 1; v < DV; v++)                                                                       \
                t = _mm512_fmadd_ps(qn[g][v], lo[v], _mm512_fmadd_ps(qp[g][v], hi[v], t));                     \
            part[g][j] = t;                                                                                    \
        }                                                                                                      \
    }                                                                                                          \
    for (int g = 0; g < G; g++) _mm512_storeu_ps(s + g * BLOCK, hsum16(part[g]));                              \
}

DEF_BOUND_DOTS(bound_g1_d64, 1, 4)
DEF_BOUND_DOTS(bound_g2_d64, 2, 4)
DEF_BOUND_DOTS(bound_g3_d64, 3, 4)
DEF_BOUND_DOTS(bound_g4_d64, 4, 4)
DEF_BOUND_DOTS(bound_g1_d128, 1, 8)
DEF_BOUND_DOTS(bound_g2_d128, 2, 8)
DEF_BOUND_DOTS(bound_g3_d128, 3, 8)
DEF_BOUND_DOTS(bound_g4_d128, 4, 8)

typedef void (*bound_fn)(const float *, const void *, const void *, int, const int64_t *, int, float *);

static bound_fn special_bound(int G, int D) {
    static const bound_fn d64[4] = {bound_g1_d64, bound_g2_d64, bound_g3_d64, bound_g4_d64};
    static const bound_fn d128[4] = {bound_g1_d128, bound_g2_d128, bound_g3_d128, bound_g4_d128};
    if (G < 1 || G > 4) return NULL;
    return D == 64 ? d64[G - 1] : D == 128 ? d128[G - 1] : NULL;
}

typedef void (*dots_fn)(const float *, const void *, int, const int64_t *, int, float *);

static dots_fn special_dots(int G, int D) {
    static const dots_fn d64[4] = {dots_g1_d64, dots_g2_d64, dots_g3_d64, dots_g4_d64};
    static const dots_fn d128[4] = {dots_g1_d128, dots_g2_d128, dots_g3_d128, dots_g4_d128};
    if (G < 1 || G > 4) return NULL;
    return D == 64 ? d64[G - 1] : D == 128 ? d128[G - 1] : NULL;
}

/* The common shapes (G <= 4 query heads per KV head, head dim 64 or 128) with G and D known at compile time: the
 * queries and the output accumulators live in registers, each K/V row is converted from bf16 once. */
#define DEF_RUN(NAME, GG, DVV, DOTS)                                                                            \
static void NAME(const float *q, const void *K, const void *V, int bf, const run_t *r, float scale, float *m,     \
                 float *l, float *accp) {                                                                       \
    int64_t n = r->n;                                                                                          \
    enum { G = GG, DV = DVV, D = 16 * DVV };                                                                   \
    __m512 acc[G][DV];                                                                                         \
    for (int g = 0; g < G; g++)                                                                                \
        for (int v = 0; v < DV; v++) acc[g][v] = _mm512_loadu_ps(accp + g * D + 16 * v);                       \
    float p[G][BLOCK], s[G * BLOCK];                                                                           \
    int64_t rowoff[BLOCK];                                                                                     \
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {                                                                \
        int nb = (int)(n - j0 < BLOCK ? n - j0 : BLOCK);                                                       \
        __mmask16 bad = (__mmask16)(nb < 16 ? ~((1u << nb) - 1u) : 0u);                                        \
        for (int j = 0; j < nb; j++)                                                                           \
            if (!run_row(r, j0 + j, D, &rowoff[j])) bad |= (__mmask16)(1u << j);                               \
        if (r->pos)        /* scattered rows: ask for the next block's K and V now, many misses in flight */   \
            for (int64_t j = j0 + BLOCK; j < j0 + 2 * BLOCK && j < n; j++) {                                   \
                int64_t off;                                                                                   \
                if (!run_row(r, j, D, &off)) continue;                                                         \
                const char *kp = (const char *)K + off * (bf ? 2 : 4), *vp = (const char *)V + off * (bf ? 2 : 4); \
                for (int c = 0; c < D * (bf ? 2 : 4); c += 64) {                                               \
                    _mm_prefetch(kp + c, _MM_HINT_T0);                                                         \
                    _mm_prefetch(vp + c, _MM_HINT_T0);                                                         \
                }                                                                                              \
            }                                                                                                  \
        DOTS(q, K, bf, rowoff, nb, s);                                                                         \
        for (int g = 0; g < G; g++) {                                                                          \
            __m512 sg = _mm512_mul_ps(_mm512_loadu_ps(s + g * BLOCK), _mm512_set1_ps(scale));                  \
            sg = _mm512_mask_mov_ps(sg, bad, _mm512_set1_ps(-INFINITY));                                       \
            float mx = _mm512_reduce_max_ps(sg);                                                               \
            mx = mx > m[g] ? mx : m[g];                                                                        \
            if (mx == -INFINITY) { _mm512_storeu_ps(p[g], _mm512_setzero_ps()); continue; }                   \
            __m512 e = exp512(_mm512_sub_ps(sg, _mm512_set1_ps(mx)), bad);                                     \
            float alpha = m[g] == -INFINITY ? 0.f : expf(m[g] - mx);                                           \
            l[g] = l[g] * alpha + _mm512_reduce_add_ps(e);                                                     \
            m[g] = mx;                                                                                         \
            _mm512_storeu_ps(p[g], e);                                                                         \
            if (alpha != 1.f) {                                                                                \
                __m512 a = _mm512_set1_ps(alpha);                                                              \
                for (int v = 0; v < DV; v++) acc[g][v] = _mm512_mul_ps(a, acc[g][v]);                          \
            }                                                                                                  \
        }                                                                                                      \
        for (int j = 0; j < nb; j++) {                                                                         \
            __m512 vr[DV];                                                                                     \
            for (int v = 0; v < DV; v++) vr[v] = ld16(V, bf, rowoff[j] + 16 * v);                              \
            for (int g = 0; g < G; g++) {                                                                      \
                __m512 w = _mm512_set1_ps(p[g][j]);                                                            \
                for (int v = 0; v < DV; v++) acc[g][v] = _mm512_fmadd_ps(w, vr[v], acc[g][v]);                 \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    for (int g = 0; g < G; g++)                                                                                \
        for (int v = 0; v < DV; v++) _mm512_storeu_ps(accp + g * D + 16 * v, acc[g][v]);                      \
}

DEF_RUN(run_g1_d64, 1, 4, dots_g1_d64)
DEF_RUN(run_g2_d64, 2, 4, dots_g2_d64)
DEF_RUN(run_g3_d64, 3, 4, dots_g3_d64)
DEF_RUN(run_g4_d64, 4, 4, dots_g4_d64)
DEF_RUN(run_g1_d128, 1, 8, dots_g1_d128)
DEF_RUN(run_g2_d128, 2, 8, dots_g2_d128)
DEF_RUN(run_g3_d128, 3, 8, dots_g3_d128)
DEF_RUN(run_g4_d128, 4, 8, dots_g4_d128)

typedef void (*run_fn)(const float *, const void *, const void *, int, const run_t *, float, float *, float *,
                       float *);

static run_fn special_run(int G, int D) {
    static const run_fn d64[4] = {run_g1_d64, run_g2_d64, run_g3_d64, run_g4_d64};
    static const run_fn d128[4] = {run_g1_d128, run_g2_d128, run_g3_d128, run_g4_d128};
    if (G < 1 || G > 4) return NULL;
    return D == 64 ? d64[G - 1] : D == 128 ? d128[G - 1] : NULL;
}

/* attend_run for D a multiple of 16: scores, softmax and the V accumulation in 16-lane vectors. */
static void attend_run_vec(const float *q, const void *K, const void *V, int bf, const run_t *r, int G, int D,
                           float scale, float *m, float *l, float *acc) {
    run_fn fast = special_run(G, D);
    if (fast) { fast(q, K, V, bf, r, scale, m, l, acc); return; }
    int64_t n = r->n;
    int DV = D / 16;
    float s[MAXG * BLOCK];
    int64_t rowoff[BLOCK];
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        int nb = (int)(n - j0 < BLOCK ? n - j0 : BLOCK);
        __mmask16 bad = (__mmask16)(nb < 16 ? ~((1u << nb) - 1u) : 0u);
        for (int j = 0; j < nb; j++)
            if (!run_row(r, j0 + j, D, &rowoff[j])) bad |= (__mmask16)(1u << j);
        dots(q, K, bf, rowoff, nb, G, D, s);
        for (int g = 0; g < G; g++) {
            __m512 sg = _mm512_mul_ps(_mm512_loadu_ps(s + g * BLOCK), _mm512_set1_ps(scale));
            sg = _mm512_mask_mov_ps(sg, bad, _mm512_set1_ps(-INFINITY));
            float mx = _mm512_reduce_max_ps(sg);
            mx = mx > m[g] ? mx : m[g];
            if (mx == -INFINITY) { _mm512_storeu_ps(s + g * BLOCK, _mm512_setzero_ps()); continue; }
            __m512 e = exp512(_mm512_sub_ps(sg, _mm512_set1_ps(mx)), bad);
            float alpha = m[g] == -INFINITY ? 0.f : expf(m[g] - mx);
            l[g] = l[g] * alpha + _mm512_reduce_add_ps(e);
            m[g] = mx;
            _mm512_storeu_ps(s + g * BLOCK, e);
            if (alpha != 1.f) {
                __m512 a = _mm512_set1_ps(alpha);
                for (int v = 0; v < DV; v++)
                    _mm512_storeu_ps(acc + g * D + 16 * v, _mm512_mul_ps(a, _mm512_loadu_ps(acc + g * D + 16 * v)));
            }
        }
        for (int j = 0; j < nb; j++) {
            __m512 vv[MAXDV];
            for (int v = 0; v < DV; v++) vv[v] = ld16(V, bf, rowoff[j] + 16 * v);
            for (int g = 0; g < G; g++) {
                __m512 w = _mm512_set1_ps(s[g * BLOCK + j]);
                float *a = acc + g * D;
                for (int v = 0; v < DV; v++)
                    _mm512_storeu_ps(a + 16 * v, _mm512_fmadd_ps(w, vv[v], _mm512_loadu_ps(a + 16 * v)));
            }
        }
    }
}
#else
static void attend_run_vec(const float *q, const void *K, const void *V, int bf, const run_t *r, int G, int D,
                           float scale, float *m, float *l, float *acc) {
    (void)q; (void)K; (void)V; (void)bf; (void)r; (void)G; (void)D; (void)scale; (void)m; (void)l; (void)acc;
}
static void dots(const float *q, const void *K, int bf, const int64_t *rowoff, int nb, int G, int D, float *s) {
    (void)q; (void)K; (void)bf; (void)rowoff; (void)nb; (void)G; (void)D; (void)s;
}
static inline int vec_ok(int D) { (void)D; return 0; }
#endif

static void dots_scalar(const float *q, const void *K, int bf, const int64_t *rowoff, int nb, int G, int D,
                        float *s) {
    float kf[MAXD];
    for (int j = 0; j < nb; j++) {
        load_row(K, bf, rowoff[j], D, kf);
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float dot = 0.f;
            for (int d = 0; d < D; d++) dot += qg[d] * kf[d];
            s[g * BLOCK + j] = dot;
        }
    }
}

/* Quest's upper bound of q . k over a page with channel-wise min ``mn`` and max ``mx``: sum_d max(q_d mn_d, q_d mx_d).
 * Same layout as dots(): s[g * BLOCK + j] for the page rows at rowoff[j] of both tables. */
static void bound_dots(const float *q, const void *mn, const void *mx, int bf, const int64_t *rowoff, int nb, int G,
                       int D, float *s) {
#ifdef __AVX512F__
    if (vec_ok(D)) {
        __m512 part[BLOCK];
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            for (int j = 0; j < BLOCK; j++) {
                __m512 acc = _mm512_setzero_ps();
                if (j < nb)
                    for (int v = 0; v < D / 16; v++) {
                        __m512 qv = _mm512_loadu_ps(qg + 16 * v);
                        acc = _mm512_add_ps(acc, _mm512_max_ps(_mm512_mul_ps(qv, ld16(mn, bf, rowoff[j] + 16 * v)),
                                                               _mm512_mul_ps(qv, ld16(mx, bf, rowoff[j] + 16 * v))));
                    }
                part[j] = acc;
            }
            _mm512_storeu_ps(s + g * BLOCK, hsum16(part));
        }
        return;
    }
#endif
    float a[MAXD], z[MAXD];
    for (int j = 0; j < nb; j++) {
        load_row(mn, bf, rowoff[j], D, a);
        load_row(mx, bf, rowoff[j], D, z);
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float t = 0.f;
            for (int d = 0; d < D; d++) { float x = qg[d] * a[d], y = qg[d] * z[d]; t += x > y ? x : y; }
            s[g * BLOCK + j] = t;
        }
    }
}

/* ------------------------------------------------------------------------------------------------ attention */


/* Fold the positions of ``r`` into one (row, KV head)'s online-softmax state: running max m[g], sum l[g],
 * unnormalised output acc[g][D]. K/V point at that (row, head)'s [T, D] rows. */
static void attend_run(const float *q, const void *K, const void *V, int bf, run_t r, int G, int D, float scale,
                       float *m, float *l, float *acc) {
    if (vec_ok(D)) {
        attend_run_vec(q, K, V, bf, &r, G, D, scale, m, l, acc);
        return;
    }
    float s[MAXG * BLOCK];
    int64_t rowoff[BLOCK];
    int ok[BLOCK];
    float vf[MAXD];
    for (int64_t j0 = 0; j0 < r.n; j0 += BLOCK) {
        int nb = (int)(r.n - j0 < BLOCK ? r.n - j0 : BLOCK);
        for (int j = 0; j < nb; j++) ok[j] = run_row(&r, j0 + j, D, &rowoff[j]);
        dots_scalar(q, K, bf, rowoff, nb, G, D, s);
        for (int g = 0; g < G; g++) {
            float *sg = s + g * BLOCK;
            float mx = m[g];
            for (int j = 0; j < nb; j++) {
                sg[j] = ok[j] ? sg[j] * scale : -INFINITY;
                mx = sg[j] > mx ? sg[j] : mx;
            }
            if (mx == -INFINITY) { for (int j = 0; j < nb; j++) sg[j] = 0.f; continue; }
            float alpha = expf(m[g] - mx);
            float sum = 0.f;
            for (int j = 0; j < nb; j++) { float e = expf(sg[j] - mx); sg[j] = e; sum += e; }
            l[g] = l[g] * alpha + sum;
            m[g] = mx;
            if (alpha != 1.f) for (int d = 0; d < D; d++) acc[g * D + d] *= alpha;
        }
        for (int j = 0; j < nb; j++) {
            if (!ok[j]) continue;
            load_row(V, bf, rowoff[j], D, vf);
            for (int g = 0; g < G; g++) {
                float w = s[g * BLOCK + j];
                float *a = acc + g * D;
                for (int d = 0; d < D; d++) a[d] += w * vf[d];
            }
        }
    }
}

/* The positions row b attends, as one virtual sequence: [0, pre[b]) | idx[b, h, :n_idx] (if use_idx[b]) |
 * [begin[b], end[b]). Returns the number of runs written to out for the virtual slice [lo, hi). */
static int slice_runs(int64_t pre, const int64_t *idx, const uint8_t *valid, int64_t n_idx, int64_t begin,
                      int64_t end, int64_t lim_lo, int64_t lim_hi, int64_t lo, int64_t hi, run_t *out) {
    int k = 0;
    int64_t seg[3][2] = {{0, pre}, {pre, pre + n_idx}, {pre + n_idx, pre + n_idx + (end - begin)}};
    for (int i = 0; i < 3; i++) {
        int64_t a = lo > seg[i][0] ? lo : seg[i][0], z = hi < seg[i][1] ? hi : seg[i][1];
        if (z <= a) continue;
        run_t r = {NULL, NULL, 0, z - a, lim_lo, lim_hi};
        if (i == 0) r.begin = a;
        else if (i == 1) { r.pos = idx + (a - pre); r.valid = valid ? valid + (a - pre) : NULL; }
        else r.begin = begin + (a - pre - n_idx);
        out[k++] = r;
    }
    return k;
}

/* q:        [B, KVH, G, D] fp32 (contiguous)
 * k, v:     the store's [B, KVH, T, D] view of one layer (row stride D), strides sb, sh in elements
 * pre, begin, end: [B]; use_idx: [B] (uint8) or NULL; idx/valid: [B, KVH, n_idx] (strides ib, ih) or NULL;
 *           idx positions outside [lim_lo, lim_hi[b]) are skipped (lim_hi NULL: no upper limit)
 * out:      [B, KVH, G, D], fp32 or bf16 (out_bf16)
 * chunk:    virtual positions per work item (the sequence split across threads, a fixed size so the result does
 *           not depend on the thread count) */
void attend(const float *q, const void *k, const void *v, int kv_bf16, int64_t sb, int64_t sh, const int64_t *pre,
            const int64_t *begin, const int64_t *end, const uint8_t *use_idx, const int64_t *idx,
            const uint8_t *valid, int64_t n_idx, int64_t ib, int64_t ih, int64_t lim_lo, const int64_t *lim_hi,
            void *out, int out_bf16, int B, int KVH, int G, int D, float scale, int64_t chunk, int nthreads) {
    int64_t *first = malloc(sizeof(int64_t) * (B + 1));
    first[0] = 0;
    for (int b = 0; b < B; b++) {
        int64_t n = pre[b] + ((idx && (!use_idx || use_idx[b])) ? n_idx : 0) + (end[b] - begin[b]);
        int64_t nc = n > 0 ? (n + chunk - 1) / chunk : 1;
        first[b + 1] = first[b] + nc * KVH;
    }
    int64_t items = first[B];
    int stride = G * (D + 2);
    float *part = malloc(sizeof(float) * (size_t)items * stride);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t it = 0; it < items; it++) {
        int b = 0;
        while (first[b + 1] <= it) b++;
        int64_t nc = (first[b + 1] - first[b]) / KVH;
        int h = (int)((it - first[b]) / nc);
        int64_t c = (it - first[b]) % nc;
        int64_t ni = (idx && (!use_idx || use_idx[b])) ? n_idx : 0;
        float *pm = part + it * stride, *pl = pm + G, *pa = pl + G;
        for (int g = 0; g < G; g++) { pm[g] = -INFINITY; pl[g] = 0.f; }
        memset(pa, 0, sizeof(float) * (size_t)G * D);
        const int64_t *ix = ni ? idx + b * ib + h * ih : NULL;
        const uint8_t *va = (ni && valid) ? valid + b * ib + h * ih : NULL;
        run_t runs[3];
        int nr = slice_runs(pre[b], ix, va, ni, begin[b], end[b], lim_lo, lim_hi ? lim_hi[b] : INT64_MAX,
                            c * chunk, (c + 1) * chunk, runs);
        const char *kb = (const char *)k + (b * sb + h * sh) * (kv_bf16 ? 2 : 4);
        const char *vb = (const char *)v + (b * sb + h * sh) * (kv_bf16 ? 2 : 4);
        const float *qh = q + ((int64_t)b * KVH + h) * G * D;
        for (int i = 0; i < nr; i++) attend_run(qh, kb, vb, kv_bf16, runs[i], G, D, scale, pm, pl, pa);
    }
    /* merge the chunks of each (b, h) */
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bh = 0; bh < (int64_t)B * KVH; bh++) {
        int b = (int)(bh / KVH), h = (int)(bh % KVH);
        int64_t nc = (first[b + 1] - first[b]) / KVH;
        int64_t it0 = first[b] + h * nc;
        for (int g = 0; g < G; g++) {
            float mx = -INFINITY;
            for (int64_t c = 0; c < nc; c++) { float mc = part[(it0 + c) * stride + g]; mx = mc > mx ? mc : mx; }
            float o[MAXD];
            memset(o, 0, sizeof(float) * D);
            float lsum = 0.f;
            if (mx != -INFINITY) {
                for (int64_t c = 0; c < nc; c++) {
                    float *pm = part + (it0 + c) * stride, *pl = pm + G, *pa = pl + G;
                    if (pm[g] == -INFINITY) continue;
                    float w = expf(pm[g] - mx);
                    lsum += w * pl[g];
                    for (int d = 0; d < D; d++) o[d] += w * pa[g * D + d];
                }
            }
            float inv = lsum > 0.f ? 1.f / lsum : 0.f;
            for (int d = 0; d < D; d++) o[d] *= inv;
            store_row(out, out_bf16, (bh * G + g) * D, D, o);
        }
    }
    free(part);
    free(first);
}

/* ------------------------------------------------------------------------------------------------ selection */

/* Scores of one chunk [j0, c1) of (row, head) -> exp(score - the chunk's max) per query head, and their sum
 * (0 where masked); st[2g] holds the chunk's max on entry, st[2g + 1] the sum on return. */
static void chunk_exp(float *sbh, float *st, int64_t n, int64_t j0, int64_t c1, int G) {
    for (int g = 0; g < G; g++) {
        float mx = st[2 * g], acc = 0.f, *e = sbh + g * n;
        int64_t j = j0;
        if (mx == -INFINITY) { memset(e + j, 0, sizeof(float) * (size_t)(c1 - j)); continue; }
#ifdef __AVX512F__
        __m512 va = _mm512_setzero_ps(), vm = _mm512_set1_ps(mx), ninf = _mm512_set1_ps(-INFINITY);
        for (; j + 16 <= c1; j += 16) {
            __m512 x = _mm512_loadu_ps(e + j);
            x = exp512(_mm512_sub_ps(x, vm), _mm512_cmp_ps_mask(x, ninf, _CMP_EQ_OQ));
            _mm512_storeu_ps(e + j, x);
            va = _mm512_add_ps(va, x);
        }
        acc = _mm512_reduce_add_ps(va);
#endif
        for (; j < c1; j++) { e[j] = e[j] == -INFINITY ? 0.f : expf(e[j] - mx); acc += e[j]; }
        st[2 * g + 1] = acc;
    }
}

/* The last two passes of a score (inside the caller's parallel region): per (row, head, query head) the merged max
 * and sum of the chunks; then each candidate's probability, its chunk's exps times one factor, aggregated over the
 * group (okbits: the candidates that may score, BLOCK per word; the others get -1). */
static void merge_probs(const float *s, const float *stat, float *glob, const uint16_t *okbits, float *out,
                        int64_t n, int64_t CH, int64_t nc, int B, int KVH, int G, int agg_max) {
    int64_t nblk = (n + BLOCK - 1) / BLOCK, items = (int64_t)B * KVH * nc;
    #pragma omp for schedule(static)
    for (int64_t bhg = 0; bhg < (int64_t)B * KVH * G; bhg++) {
        int64_t bh = bhg / G;
        int g = (int)(bhg % G);
        float mx = -INFINITY, sum = 0.f;
        for (int64_t c = 0; c < nc; c++) { float m = stat[((bh * nc + c) * G + g) * 2]; mx = m > mx ? m : mx; }
        if (mx != -INFINITY)
            for (int64_t c = 0; c < nc; c++) {
                const float *st = stat + ((bh * nc + c) * G + g) * 2;
                if (st[0] != -INFINITY) sum += st[1] * expf(st[0] - mx);
            }
        glob[bhg * 2] = mx;
        glob[bhg * 2 + 1] = sum;
    }
    #pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {       /* probability = exp(score - chunk max) * this factor */
        int64_t bh = it / nc, c = it % nc;
        const float *sbh = s + bh * G * n, *st = stat + it * G * 2;
        float *o = out + bh * n, f[MAXG];
        int live = 0;                               /* some head has a distribution: a candidate can score */
        for (int g = 0; g < G; g++) {
            float gmx = glob[(bh * G + g) * 2], sum = glob[(bh * G + g) * 2 + 1];
            live |= sum > 0.f;
            f[g] = sum > 0.f && st[2 * g] != -INFINITY ? expf(st[2 * g] - gmx) / sum : 0.f;
        }
        int64_t c1 = (c + 1) * CH < n ? (c + 1) * CH : n;
        int64_t j = c * CH;
#ifdef __AVX512F__
        for (; j + 16 <= c1; j += 16) {
            __m512 a = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                __m512 pr = _mm512_mul_ps(_mm512_loadu_ps(sbh + g * n + j), _mm512_set1_ps(f[g]));
                a = agg_max ? _mm512_max_ps(a, pr) : _mm512_add_ps(a, pr);
            }
            __mmask16 ok = live ? (__mmask16)okbits[bh * nblk + j / BLOCK] : 0;
            _mm512_storeu_ps(o + j, _mm512_mask_mov_ps(_mm512_set1_ps(-1.f), ok, a));
        }
#endif
        for (; j < c1; j++) {
            float a = 0.f;
            for (int g = 0; g < G; g++) {
                float pr = sbh[g * n + j] * f[g];
                a = agg_max ? (pr > a ? pr : a) : a + pr;
            }
            o[j] = (live && ((okbits[bh * nblk + j / BLOCK] >> (j % BLOCK)) & 1)) ? a : -1.f;
        }
    }
}

/* The in-line check's ranking, no softmax: each candidate's largest scaled score less its query head's maximum over
 * all candidates (how close some head of the group comes to its best); masked candidates -FLT_MAX. st holds each
 * chunk's max per query head (chunk_exp not run). Inside the caller's parallel region. */
static void merge_logits(const float *s, const float *stat, float *glob, const uint16_t *okbits, float *out,
                         int64_t n, int64_t CH, int64_t nc, int B, int KVH, int G) {
    int64_t nblk = (n + BLOCK - 1) / BLOCK, items = (int64_t)B * KVH * nc;
    #pragma omp for schedule(static)
    for (int64_t bhg = 0; bhg < (int64_t)B * KVH * G; bhg++) {
        int64_t bh = bhg / G;
        int g = (int)(bhg % G);
        float mx = -FLT_MAX;
        for (int64_t c = 0; c < nc; c++) { float m = stat[((bh * nc + c) * G + g) * 2]; mx = m > mx ? m : mx; }
        glob[bhg * 2] = mx;
    }
    #pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
        int64_t bh = it / nc, c = it % nc;
        const float *sbh = s + bh * G * n;
        float *o = out + bh * n;
        int64_t c1 = (c + 1) * CH < n ? (c + 1) * CH : n, j = c * CH;
#ifdef __AVX512F__
        for (; j + 16 <= c1; j += 16) {
            __m512 a = _mm512_set1_ps(-FLT_MAX);
            for (int g = 0; g < G; g++)
                a = _mm512_max_ps(a, _mm512_sub_ps(_mm512_loadu_ps(sbh + g * n + j),
                                                   _mm512_set1_ps(glob[(bh * G + g) * 2])));
            _mm512_storeu_ps(o + j, _mm512_mask_mov_ps(_mm512_set1_ps(-FLT_MAX),
                                                       (__mmask16)okbits[bh * nblk + j / BLOCK], a));
        }
#endif
        for (; j < c1; j++) {
            float a = -FLT_MAX;
            for (int g = 0; g < G; g++) {
                float x = sbh[g * n + j] - glob[(bh * G + g) * 2];
                a = x > a ? x : a;
            }
            o[j] = ((okbits[bh * nblk + j / BLOCK] >> (j % BLOCK)) & 1) ? a : -FLT_MAX;
        }
    }
}

/* A score's working memory: scaled scores [B, KVH, G, n], per chunk and query head (max, sum), per query head the
 * merged (max, sum), and the candidates that may score (BLOCK bits a word). */
typedef struct { float *s, *stat, *glob; uint16_t *okbits; int64_t nc, items, nblk; } score_mem;

static score_mem score_alloc(int B, int KVH, int G, int64_t n, int64_t CH) {
    score_mem m;
    m.nc = (n + CH - 1) / CH;
    m.items = (int64_t)B * KVH * m.nc;
    m.nblk = (n + BLOCK - 1) / BLOCK;                 /* CH is a multiple of BLOCK: blocks never straddle */
    m.s = malloc(sizeof(float) * (size_t)B * KVH * G * n);
    m.stat = malloc(sizeof(float) * (size_t)m.items * G * 2);
    m.glob = malloc(sizeof(float) * (size_t)B * KVH * G * 2);
    m.okbits = malloc(sizeof(uint16_t) * (size_t)(B * KVH * m.nblk > 0 ? B * KVH * m.nblk : 1));
    return m;
}

static void score_free(score_mem *m) {
    free(m->okbits);
    free(m->glob);
    free(m->stat);
    free(m->s);
}

/* Aggregated probability of candidate keys, for top-k selection.
 * q [B, KVH, G, D] fp32; keys: the store view as in attend; candidates: positions [lo, lo + n) masked from
 * hi[b] on (idx NULL), or idx [B, KVH, n] with valid (may be NULL) and, when hi is given, only positions in
 * [lo, hi[b]); out [B, KVH, n] fp32. agg_max: max over the
 * group instead of sum. Masked candidates get -1 (below any probability). With ``k2`` the rows are pages: k holds
 * their channel-wise minima, k2 their maxima, and a page scores Quest's upper bound of q . k over its keys.
 * Three passes, the first and last split over (row, head, chunk of candidates) across the threads: scaled scores,
 * turned into exp(score - the chunk's max) with the chunk's sum; per (row, head, query head) the merged max and sum;
 * the probabilities, each chunk's exps times one factor (one exp per score, not two). */
#define SCORE_AHEAD 64
static inline int cand(const int64_t *pos, const uint8_t *val, int64_t lo, const int64_t *hi, int b, int64_t j,
                       int64_t *p) {
    *p = pos ? pos[j] : lo + j;
    if (pos) return (!val || val[j]) && (!hi || (*p >= lo && *p < hi[b]));
    return *p < hi[b];
}

void score(const float *q, const void *k, const void *k2, int kv_bf16, int64_t sb, int64_t sh, int64_t lo,
           const int64_t *hi, const int64_t *idx, const uint8_t *valid, int64_t n, int64_t ib, int64_t ih, float *out,
           int B, int KVH, int G, int D, float scale, int agg_max, int gathered, int nthreads) {
    int vec = vec_ok(D);
#ifdef __AVX512F__
    dots_fn fast = (vec && !k2) ? special_dots(G, D) : NULL;
    bound_fn fast_bound = (vec && k2) ? special_bound(G, D) : NULL;
#endif
    const int64_t CH = 1024, rowbytes = (int64_t)D * (kv_bf16 ? 2 : 4);
    score_mem m = score_alloc(B, KVH, G, n, CH);
    float *s = m.s, *stat = m.stat, *glob = m.glob;
    uint16_t *okbits = m.okbits;
    int64_t nc = m.nc, items = m.items, nblk = m.nblk;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            int64_t bh = it / nc, c = it % nc;
            int b = (int)(bh / KVH), h = (int)(bh % KVH);
            const float *qh = q + bh * G * D;
            const int64_t *pos = idx ? idx + b * ib + h * ih : NULL;
            const uint8_t *val = (idx && valid) ? valid + b * ib + h * ih : NULL;
            const char *kb = (const char *)k + (b * sb + h * sh) * (kv_bf16 ? 2 : 4);
            const char *kb2 = k2 ? (const char *)k2 + (b * sb + h * sh) * (kv_bf16 ? 2 : 4) : NULL;
            float *sbh = s + bh * G * n, *st = stat + it * G * 2;
            float blk[MAXG * BLOCK];
            int64_t rowoff[BLOCK];
            for (int g = 0; g < G; g++) { st[2 * g] = -INFINITY; st[2 * g + 1] = 0.f; }
            int64_t c1 = (c + 1) * CH < n ? (c + 1) * CH : n;
#ifdef __AVX512F__
            __m512 vmax[MAXG];
            for (int g = 0; g < G; g++) vmax[g] = _mm512_set1_ps(-INFINITY);
#endif
            for (int64_t j0 = c * CH; j0 < c1; j0 += BLOCK) {
                int nb = (int)(c1 - j0 < BLOCK ? c1 - j0 : BLOCK);
                uint16_t ok = 0;
#ifdef __AVX512F__
                if (gathered && pos && !val && hi) {
                    /* the refinement's case: row j of the buffer is candidate j's key; the positions only decide
                     * the mask, 8 at a time (a branch per candidate costs as much as its dot products) */
                    __mmask8 m[2];
                    for (int h8 = 0; h8 < 2; h8++) {
                        int left = nb - 8 * h8;
                        __mmask8 live = (__mmask8)(left >= 8 ? 0xFF : left > 0 ? (1u << left) - 1u : 0);
                        __m512i p8 = _mm512_maskz_loadu_epi64(live, pos + j0 + 8 * h8);
                        m[h8] = _mm512_mask_cmpge_epi64_mask(live, p8, _mm512_set1_epi64(lo)) &
                                _mm512_cmplt_epi64_mask(p8, _mm512_set1_epi64(hi[b]));
                    }
                    ok = (uint16_t)(m[0] | (m[1] << 8));
                    for (int j = 0; j < nb; j++) rowoff[j] = (j0 + j) * D;
                    if (j0 + BLOCK + SCORE_AHEAD < c1)
                        for (int64_t x = 0; x < BLOCK * rowbytes; x += 64)
                            __builtin_prefetch(kb + (j0 + SCORE_AHEAD) * rowbytes + x, 0, 3);
                } else
#endif
                for (int j = 0; j < nb; j++) {
                    int64_t p;
                    int o = cand(pos, val, lo, hi, b, j0 + j, &p);
                    /* masked: row 0 (valid); gathered: candidate j's key is row j, p only decides the mask */
                    rowoff[j] = o ? (gathered ? j0 + j : p) * D : 0;
                    ok |= (uint16_t)(o << j);
                }
                okbits[bh * nblk + j0 / BLOCK] = ok;        /* the last pass masks by these bits */
#ifdef __AVX512F__
                if (fast_bound) fast_bound(qh, kb, kb2, kv_bf16, rowoff, nb, blk);
                else
#endif
                if (kb2) bound_dots(qh, kb, kb2, kv_bf16, rowoff, nb, G, D, blk);
                else
#ifdef __AVX512F__
                if (fast) fast(qh, kb, kv_bf16, rowoff, nb, blk);
                else
#endif
                if (vec) dots(qh, kb, kv_bf16, rowoff, nb, G, D, blk);
                else dots_scalar(qh, kb, kv_bf16, rowoff, nb, G, D, blk);
#ifdef __AVX512F__
                __mmask16 live = (__mmask16)(nb < 16 ? (1u << nb) - 1u : 0xFFFFu);
                for (int g = 0; g < G; g++) {
                    __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), (__mmask16)ok,
                                                  _mm512_loadu_ps(blk + g * BLOCK), _mm512_set1_ps(scale));
                    _mm512_mask_storeu_ps(sbh + g * n + j0, live, x);
                    vmax[g] = _mm512_max_ps(vmax[g], x);
                }
#else
                for (int j = 0; j < nb; j++)
                    for (int g = 0; g < G; g++) {
                        float x = (ok >> j) & 1 ? blk[g * BLOCK + j] * scale : -INFINITY;
                        sbh[g * n + j0 + j] = x;
                        st[2 * g] = x > st[2 * g] ? x : st[2 * g];
                    }
#endif
            }
#ifdef __AVX512F__
            for (int g = 0; g < G; g++) st[2 * g] = _mm512_reduce_max_ps(vmax[g]);
#endif
            chunk_exp(sbh, st, n, c * CH, c1, G);
        }
        merge_probs(s, stat, glob, okbits, out, n, CH, nc, B, KVH, G, agg_max);
    }
    score_free(&m);
}

/* ------------------------------------------------------------------------------------------------ key sketch */

/* A 4-bit copy of the keys, for the candidate scan (a quarter of a bf16 key's bytes): per (slot, KV head) token p
 * is quantized over its D channels, u = round((k - min) * 15 / (max - min)), kept as scale (max - min) / 15 and
 * min (kq rows 0 and 1, [2, T] floats) and D / 2 bytes of nibbles in blocks of 16 tokens, laid out for VNNI: block
 * p / 16 holds D / 8 vectors of 64 bytes, vector v has token t's channels 4v..4v+3 at bytes 4t..4t+3 in the low
 * nibbles and channels D/2 + 4v.. in the high ones. One multiply-add then scores 4 channels of 16 tokens. */
static void sketch_token(const void *krow, int bf, uint8_t *blk, float *kq, int64_t T, int64_t p, int D) {
    float x[512], mn = INFINITY, mx = -INFINITY;
    for (int d = 0; d < D; d++) {
        x[d] = bf ? bf2f(((const bf16 *)krow)[d]) : ((const float *)krow)[d];
        mn = x[d] < mn ? x[d] : mn;
        mx = x[d] > mx ? x[d] : mx;
    }
    float inv = mx > mn ? 15.f / (mx - mn) : 0.f;
    int t = (int)(p % 16), half = D / 2;
    for (int d = 0; d < half; d++) {
        int lo = (int)nearbyintf((x[d] - mn) * inv), hi = (int)nearbyintf((x[d + half] - mn) * inv);
        lo = lo < 0 ? 0 : lo > 15 ? 15 : lo;
        hi = hi < 0 ? 0 : hi > 15 ? 15 : hi;
        blk[(d / 4) * 64 + t * 4 + d % 4] = (uint8_t)(lo | hi << 4);
    }
    kq[p] = (mx - mn) / 15.f;
    kq[T + p] = mn;
}

/* Sketch the keys at positions [start[b], start[b] + count) of every row and KV head. k: the layer's [B, KVH, T, D]
 * store view (element strides sb, sh); ks: [B, KVH, T / 16 blocks, 8 D] bytes (strides kb, kh); kq: [B, KVH, 2, T]
 * floats (strides qb, qh). */
void sketch_write(const void *k, int bf, int64_t sb, int64_t sh, uint8_t *ks, int64_t kb, int64_t kh, float *kq,
                  int64_t qb, int64_t qh, int64_t T, const int64_t *start, int64_t count, int B, int KVH, int D,
                  int nthreads) {
    int es = bf ? 2 : 4;
    int64_t items = (int64_t)B * KVH * count;
    #pragma omp parallel for schedule(static) num_threads(items >= 256 ? nthreads : 1)
    for (int64_t it = 0; it < items; it++) {
        int64_t bh = it / count, p = start[bh / KVH] + it % count;
        int b = (int)(bh / KVH), h = (int)(bh % KVH);
        sketch_token((const char *)k + ((b * sb + h * sh) + p * D) * es, bf, ks + b * kb + h * kh + (p / 16) * 8 * D,
                     kq + b * qb + h * qh, T, p, D);
    }
}

/* score()'s aggregated probabilities of positions [0, n), masked outside [lo, hi[b]), from the sketch instead of
 * the keys: q . k ~ scale_p (q . u_p) + min_p sum(q), with q quantized to int8 per query head for the integer dot
 * products (exact, and the torch reference does the same). */
void sketch_score(const float *q, const uint8_t *ks, const float *kq, int64_t kb, int64_t kh, int64_t qb,
                  int64_t qh, int64_t T, int64_t lo, const int64_t *hi, int64_t n, float *out, int B, int KVH, int G,
                  int D, float scale, int agg_max, int nthreads) {
    const int64_t CH = 1024;
    score_mem m = score_alloc(B, KVH, G, n, CH);
    float *s = m.s, *stat = m.stat, *glob = m.glob;
    uint16_t *okbits = m.okbits;
    int64_t nc = m.nc, items = m.items, nblk = m.nblk;
    int nq = B * KVH * G, V = D / 8;
    int8_t *qi = malloc((size_t)nq * D);                 /* per query head: int8 query, its scale, its sum */
    float *qs = malloc(sizeof(float) * (size_t)nq * 2);
    for (int i = 0; i < nq; i++) {
        const float *qr = q + (int64_t)i * D;
        float amax = 0.f, sum = 0.f;
        for (int d = 0; d < D; d++) { amax = fabsf(qr[d]) > amax ? fabsf(qr[d]) : amax; sum += qr[d]; }
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int d = 0; d < D; d++) qi[(int64_t)i * D + d] = (int8_t)nearbyintf(qr[d] * inv);
        qs[2 * i] = amax / 127.f;
        qs[2 * i + 1] = sum;
    }
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            int64_t bh = it / nc, c = it % nc;
            int b = (int)(bh / KVH), h = (int)(bh % KVH);
            const uint8_t *kbh = ks + b * kb + h * kh;
            const float *sc = kq + b * qb + h * qh, *mn = sc + T;
            float *sbh = s + bh * G * n, *st = stat + it * G * 2;
            int64_t c1 = (c + 1) * CH < n ? (c + 1) * CH : n;
            for (int g = 0; g < G; g++) { st[2 * g] = -INFINITY; st[2 * g + 1] = 0.f; }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
            __m512 vmax[MAXG];
            for (int g = 0; g < G; g++) vmax[g] = _mm512_set1_ps(-INFINITY);
#endif
            for (int64_t j0 = c * CH; j0 < c1; j0 += BLOCK) {
                int nb = (int)(c1 - j0 < BLOCK ? c1 - j0 : BLOCK);
                /* positions j0 + [a, z) of the block lie in [lo, hi[b]) */
                int64_t a = lo - j0, z = hi[b] - j0;
                a = a < 0 ? 0 : a > nb ? nb : a;
                z = z < a ? a : z > nb ? nb : z;
                uint16_t ok = (uint16_t)(((1u << z) - 1u) & ~((1u << a) - 1u));
                okbits[bh * nblk + j0 / BLOCK] = ok;
                const uint8_t *blk = kbh + (j0 / 16) * 8 * D;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
                __m512i acc[MAXG];
                for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_si512();
                const __m512i m4 = _mm512_set1_epi8(15);
                for (int v = 0; v < V; v++) {
                    __m512i x = _mm512_loadu_si512(blk + v * 64);
                    __m512i lo4 = _mm512_and_si512(x, m4), hi4 = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
                    for (int g = 0; g < G; g++) {
                        const int8_t *qg = qi + (bh * G + g) * D;
                        int32_t a, z;
                        memcpy(&a, qg + 4 * v, 4);
                        memcpy(&z, qg + D / 2 + 4 * v, 4);
                        acc[g] = _mm512_dpbusd_epi32(acc[g], lo4, _mm512_set1_epi32(a));
                        acc[g] = _mm512_dpbusd_epi32(acc[g], hi4, _mm512_set1_epi32(z));
                    }
                }
                __mmask16 live = (__mmask16)(nb < 16 ? (1u << nb) - 1u : 0xFFFFu);
                __m512 vsc = _mm512_maskz_loadu_ps(live, sc + j0), vmn = _mm512_maskz_loadu_ps(live, mn + j0);
                for (int g = 0; g < G; g++) {
                    const float *qq = qs + 2 * (bh * G + g);
                    __m512 x = _mm512_fmadd_ps(_mm512_mul_ps(vsc, _mm512_set1_ps(qq[0])), _mm512_cvtepi32_ps(acc[g]),
                                               _mm512_mul_ps(vmn, _mm512_set1_ps(qq[1])));
                    x = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), (__mmask16)ok, x, _mm512_set1_ps(scale));
                    _mm512_mask_storeu_ps(sbh + g * n + j0, live, x);
                    vmax[g] = _mm512_mask_max_ps(vmax[g], live, vmax[g], x);
                }
#else
                for (int g = 0; g < G; g++) {
                    const int8_t *qg = qi + (bh * G + g) * D;
                    const float qsc = qs[2 * (bh * G + g)], qsum = qs[2 * (bh * G + g) + 1];
                    for (int j = 0; j < nb; j++) {
                        int32_t dot = 0;
                        for (int v = 0; v < V; v++)
                            for (int e = 0; e < 4; e++) {
                                uint8_t u = blk[v * 64 + j * 4 + e];
                                dot += (u & 15) * qg[4 * v + e] + (u >> 4) * qg[D / 2 + 4 * v + e];
                            }
                        int64_t p = j0 + j;
                        float x = (ok >> j) & 1 ? (sc[p] * qsc * (float)dot + mn[p] * qsum) * scale : -INFINITY;
                        sbh[g * n + p] = x;
                        st[2 * g] = x > st[2 * g] ? x : st[2 * g];
                    }
                }
#endif
            }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
            for (int g = 0; g < G; g++) st[2 * g] = _mm512_reduce_max_ps(vmax[g]);
#endif
            if (agg_max < 2) chunk_exp(sbh, st, n, c * CH, c1, G);
        }
        if (agg_max == 2) merge_logits(s, stat, glob, okbits, out, n, CH, nc, B, KVH, G);
        else merge_probs(s, stat, glob, okbits, out, n, CH, nc, B, KVH, G, agg_max);
    }
    free(qs);
    free(qi);
    score_free(&m);
}

/* Entries of extra [B, KVH, m] that are among cand [B, KVH, n] (both positions < T, or < 0 for none) become -1:
 * a bitmap of each row's candidates, then one lookup per extra entry. */
void drop_seen(const int64_t *cand, int64_t n, int64_t *extra, int64_t m, int64_t T, int B, int KVH) {
    int64_t words = (T + 63) / 64;
    uint64_t *seen = malloc(sizeof(uint64_t) * (size_t)words);
    for (int64_t bh = 0; bh < (int64_t)B * KVH; bh++) {
        memset(seen, 0, sizeof(uint64_t) * (size_t)words);
        const int64_t *c = cand + bh * n;
        for (int64_t j = 0; j < n; j++)
            if (c[j] >= 0 && c[j] < T) seen[c[j] >> 6] |= 1ull << (c[j] & 63);
        int64_t *e = extra + bh * m;
        for (int64_t j = 0; j < m; j++)
            if (e[j] >= 0 && e[j] < T && (seen[e[j] >> 6] >> (e[j] & 63) & 1)) e[j] = -1;
    }
    free(seen);
}

/* The k largest scores of each (row, KV head) -> their positions, ascending. Ties go to the lower candidate index
 * (deterministic). Candidate j is at position idx[b, h, j] (idx non-NULL, strides ib, ih) or lo + j; with
 * expand > 1 each picked position p stands for [p * expand, (p + 1) * expand) (pages -> their tokens).
 * With hi (per row, may be NULL): positions >= hi[b] become -1, and ``gap`` more columns follow, hi[b] + j capped
 * at limit - 1 (a candidate list's reserved newest positions). scores [B, KVH, n]; out [B, KVH, k * expand + gap]. */
static inline uint32_t order_key(float f) {        /* unsigned keys in the floats' order (NaN aside) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The key of the k-th largest of keys[0..n) (1 <= k <= n), with every loop branch-free in the data (a quickselect
 * mispredicts on fresh scores, 5-7x slower than on data it has seen): a bitwise search with vector counts, or
 * without AVX-512 a radix selection, 11 + 11 + 10 bits. */
static uint32_t kth_largest_key(const uint32_t *keys, int64_t n, int64_t k) {
#ifdef __AVX512F__
    /* the largest t with #{keys >= t} >= k, one bit at a time from the top; each count is a vector compare and a
     * popcount per 16 keys (32 passes over keys in L1: the top-k of 4K scores 0.67-0.72x the radix's time) */
    uint32_t t = 0;
    for (int bit = 31; bit >= 0; bit--) {
        uint32_t c = t | (1u << bit);
        __m512i vc = _mm512_set1_epi32((int)c);
        int64_t cnt = 0, j = 0;
        for (; j + 16 <= n; j += 16)
            cnt += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + j), vc));
        for (; j < n; j++) cnt += keys[j] >= c;
        if (cnt >= k) t = c;
    }
    return t;
#else
    static const int shift[3] = {21, 10, 0}, width[3] = {11, 11, 10};
    uint32_t prefix = 0, mask = 0;
    int64_t want = k;
    for (int pass = 0; pass < 3; pass++) {
        int64_t cnt[2048] = {0};
        uint32_t bmask = (1u << width[pass]) - 1u;
        for (int64_t j = 0; j < n; j++)
            cnt[(keys[j] >> shift[pass]) & bmask] += (keys[j] & mask) == prefix;
        int64_t bkt = bmask;
        for (; bkt > 0 && cnt[bkt] < want; bkt--) want -= cnt[bkt];
        prefix |= (uint32_t)bkt << shift[pass];
        mask |= bmask << shift[pass];
    }
    return prefix;
#endif
}

/* The same for k far below n (k * 64 <= n: the in-line check's few best of a whole cache): the k-th largest of the
 * maxima of blocks of 32 is a lower bound of the answer (k blocks hold a key at least that large), so only the keys
 * at or above it (a short list, a few k in practice) need the full search: two passes over the keys, not 32. */
static uint32_t kth_largest_few(const uint32_t *keys, int64_t n, int64_t k) {
    int64_t nb = n / 32, m = 0;
    uint32_t *best = malloc(sizeof(uint32_t) * (size_t)(nb + n));
    uint32_t *shortlist = best + nb;
    for (int64_t b = 0; b < nb; b++) {
        uint32_t mx = 0;
        for (int j = 0; j < 32; j++) mx = keys[b * 32 + j] > mx ? keys[b * 32 + j] : mx;
        best[b] = mx;
    }
    uint32_t floor_key = kth_largest_key(best, nb, k);
    for (int64_t j = 0; j < n; j++)                     /* keepers are rare: a branch that is predicted */
        if (keys[j] >= floor_key) shortlist[m++] = keys[j];
    uint32_t t = kth_largest_key(shortlist, m, k);
    free(best);
    return t;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

void topk(const float *scores, int64_t n, int64_t k, const int64_t *idx, int64_t ib, int64_t ih, int64_t lo,
          int64_t expand, const int64_t *hi, int64_t gap, int64_t limit, int64_t *out, int B, int KVH,
          int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bh = 0; bh < (int64_t)B * KVH; bh++) {
        int b = (int)(bh / KVH), h = (int)(bh % KVH);
        const float *s = scores + bh * n;
        int64_t kk = k < n ? k : n;
        int64_t *ix = malloc(sizeof(int64_t) * (size_t)(kk + 1));
        const int64_t *pos = idx ? idx + b * ib + h * ih : NULL;
        /* the k-th best value is the threshold: every candidate above it, then the ties in candidate order */
        uint32_t *key = malloc(sizeof(uint32_t) * (size_t)(n > 0 ? n : 1));
        for (int64_t j = 0; j < n; j++) key[j] = order_key(s[j]);
        uint32_t thr = 0;
        int64_t ties = kk;
        if (kk < n) {
            thr = kk * 64 <= n ? kth_largest_few(key, n, kk) : kth_largest_key(key, n, kk);
            int64_t above = 0;
            for (int64_t j = 0; j < n; j++) above += key[j] > thr;
            ties = kk - above;
        }
        int64_t m = 0, sorted = 1;
        if (kk * 64 <= n) {                               /* few picks among many: a predicted branch per key */
            for (int64_t j = 0; j < n && m < kk; j++)
                if (key[j] > thr || (key[j] == thr && ties > 0)) {
                    ties -= key[j] == thr;
                    ix[m] = pos ? pos[j] : lo + j;
                    sorted &= m == 0 || ix[m] >= ix[m - 1];
                    m++;
                }
        } else for (int64_t j = 0; j < n && m < kk; j++) {   /* branch-free: write every candidate, advance on a pick */
            int64_t eq = key[j] == thr && ties > 0;
            int64_t take = key[j] > thr || eq;
            ties -= eq;
            ix[m] = pos ? pos[j] : lo + j;
            sorted &= !take || m == 0 || ix[m] >= ix[m - 1];
            m += take;
        }
        free(key);
        if (!sorted) qsort(ix, (size_t)kk, sizeof(int64_t), cmp_i64);   /* candidates not in position order */
        int64_t *o = out + bh * (k * expand + gap);
        for (int64_t j = 0; j < k; j++)
            for (int64_t e = 0; e < expand; e++) {
                int64_t p = (j < kk ? ix[j] : ix[kk - 1]) * expand + e;
                o[j * expand + e] = hi && p >= hi[b] ? -1 : p;
            }
        for (int64_t j = 0; j < gap; j++) o[k * expand + j] = hi[b] + j < limit ? hi[b] + j : limit - 1;
        free(ix);
    }
}

/* The temporal ridge forecast of the next query (AsyncSpade's predictor): per row r of windows w [R, W, D] holding
 * count[r] valid newest entries (oldest first), fit q_t ~ sum_{j<p} a_j q_{t-1-j} on the window by ridge regression,
 * (X^T X + eps * mean diag * I) a = X^T y, and predict sum_j a_j q_{t-j}. Rows with count <= p predict their last
 * query. out [R, D]. The same arithmetic as predictor.forecast("ar"), one call for every head of every row. */
void ridge_forecast(const float *w, const int64_t *count, int64_t R, int W, int D, int p, float eps, float *out,
                    int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; r++) {
        const float *x = w + r * W * D;
        float *o = out + r * D;
        int64_t cnt = count[r] < W ? count[r] : W;
        if (cnt <= p) { memcpy(o, x + (W - 1) * D, sizeof(float) * D); continue; }
        int first = (int)(W - cnt);
        float G[64][64];                              /* Gram of the window's valid entries (W <= 64) */
        for (int i = first; i < W; i++)
            for (int j = first; j <= i; j++) {
                float t = 0.f;
                for (int d = 0; d < D; d++) t += x[i * D + d] * x[j * D + d];
                G[i][j] = G[j][i] = t;
            }
        double A[16][17];                             /* p x p system, augmented with the right-hand side */
        for (int i = 0; i < p; i++) {
            for (int j = 0; j < p; j++) A[i][j] = 0.0;
            A[i][p] = 0.0;
        }
        for (int tau = first + p; tau < W; tau++)     /* targets whose p lags are all inside the window */
            for (int i = 0; i < p; i++) {
                for (int j = 0; j < p; j++) A[i][j] += G[tau - 1 - i][tau - 1 - j];
                A[i][p] += G[tau - 1 - i][tau];
            }
        double diag = 0.0;
        for (int i = 0; i < p; i++) diag += A[i][i];
        diag /= p;
        if (diag < 1e-12) diag = 1e-12;
        for (int i = 0; i < p; i++) A[i][i] += eps * diag;
        for (int c = 0; c < p; c++) {                 /* Gaussian elimination, partial pivoting */
            int piv = c;
            for (int i = c + 1; i < p; i++) if (fabs(A[i][c]) > fabs(A[piv][c])) piv = i;
            if (piv != c) for (int j = 0; j <= p; j++) { double t = A[c][j]; A[c][j] = A[piv][j]; A[piv][j] = t; }
            for (int i = c + 1; i < p; i++) {
                double f = A[i][c] / A[c][c];
                for (int j = c; j <= p; j++) A[i][j] -= f * A[c][j];
            }
        }
        double a[16];
        for (int i = p - 1; i >= 0; i--) {
            double t = A[i][p];
            for (int j = i + 1; j < p; j++) t -= A[i][j] * a[j];
            a[i] = t / A[i][i];
        }
        for (int d = 0; d < D; d++) {
            double t = 0.0;
            for (int j = 0; j < p; j++) t += a[j] * x[(W - 1 - j) * D + d];
            o[d] = (float)t;
        }
    }
}

/* ------------------------------------------------------------------------------------------------ LM head */

/* out [M, N] fp32 = x [M, K] (fp32 or bf16) . (w [N, K] int8 * scale [N])^T in fp32 arithmetic: decode's int8
 * projections (a few rows of activations; torch's int8 kernel wants bf16 activations and rounds its output to bf16,
 * this one keeps both in fp32 at the same speed: memory-bound) and the LM head's full-precision logits. Rows of w in
 * blocks of 16 over the threads; each block's 16 dot products per x row are reduced together. */
/* weight rows linear_i8 prefetches ahead (~14 KB of the LM head's rows): 11.8 -> 16.9 GB/s from memory here */
#define I8_AHEAD_ROWS 24
void linear_i8(const void *x, int x_bf16, const int8_t *w, const float *scale, float *out, int M, int N, int K,
               int nthreads) {
    float *xf = (float *)x;                            /* fp32 input: read in place */
    if (x_bf16) {
        xf = malloc(sizeof(float) * (size_t)M * K);
        for (int m = 0; m < M; m++) load_row(x, 1, (int64_t)m * K, K, xf + (int64_t)m * K);
    }
    int64_t blocks = (N + 15) / 16;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int n0 = (int)(blk * 16), nb = N - n0 < 16 ? N - n0 : 16;
        for (int m0 = 0; m0 < M; m0 += 8) {               /* up to 8 activation rows share each weight's conversion */
            int mm = M - m0 < 8 ? M - m0 : 8;
            float res[8][16];
#ifdef __AVX512F__
            if (K % 16 == 0) {
                __m512 part[8][16];
                for (int j = 0; j < 16; j++) {
                    __m512 acc[8];
                    for (int m = 0; m < 8; m++) acc[m] = _mm512_setzero_ps();
                    if (j < nb) {
                        const int8_t *wr = w + (int64_t)(n0 + j) * K;
                        if (m0 == 0 && n0 + j + I8_AHEAD_ROWS < N)   /* the bus stays busy: ask for a later row */
                            for (int k = 0; k < K; k += 64)
                                _mm_prefetch((const char *)(wr + (int64_t)I8_AHEAD_ROWS * K + k), _MM_HINT_T0);
                        for (int k = 0; k < K; k += 16) {
                            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                _mm_loadu_si128((const __m128i *)(wr + k))));
                            for (int m = 0; m < mm; m++)
                                acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xf + (int64_t)(m0 + m) * K + k), wv, acc[m]);
                        }
                    }
                    for (int m = 0; m < mm; m++) part[m][j] = acc[m];
                }
                for (int m = 0; m < mm; m++) _mm512_storeu_ps(res[m], hsum16(part[m]));
            } else
#endif
            for (int m = 0; m < mm; m++)
                for (int j = 0; j < nb; j++) {
                    const int8_t *wr = w + (int64_t)(n0 + j) * K;
                    const float *xm = xf + (int64_t)(m0 + m) * K;
                    float acc = 0.f;
                    for (int k = 0; k < K; k++) acc += xm[k] * (float)wr[k];
                    res[m][j] = acc;
                }
            for (int m = 0; m < mm; m++)
                for (int j = 0; j < nb; j++) out[(int64_t)(m0 + m) * N + n0 + j] = res[m][j] * scale[n0 + j];
        }
    }
    if (x_bf16) free(xf);
}

/* out [M, N] fp32 = x [M, K] (fp32 or bf16) . W^T for int4 weights in groups of 32 columns, as Q4_1: w = q * scale +
 * min with q in [0, 15]. w4 [N, K/2]: byte j of group g holds column 32g + j in its low nibble and 32g + 16 + j in
 * its high one; sm [N, K/32, 2] fp16 (scale, min), as GGUF stores them: a Q4_1 checkpoint converts exactly.
 * Each activation row is quantized to 16 bits per group of 32 (scale max|x| / 32639, round to nearest even), kept
 * as two int8 planes (x = 256 a + b), so the integer dot products of a group are exact on VNNI (64 weight x
 * activation bytes an instruction); then y = sum_g scale_g * xscale_g * dot_g + min_g * sum(x over g), the last with
 * the fp32 x. 8-bit activations (llama.cpp's Q8_1) are one plane and twice as fast, but activation outliers cost
 * the bundled model 8x the KL against fp32 (0.0093 vs 0.0011 on reasoning traces); fp32 products are
 * compute-bound at half the memory bus (2-core AMD EPYC). Each activation row on its own: a row's result does not
 * depend on the others. Weight rows in blocks of 64 over the threads, in tiles of 8 or 4 rows. */
typedef struct { int8_t *alo, *ahi, *blo, *bhi; float *xs4, *sum4; } xq_t;   /* planes, per-lane scales, sums/4 */

#define Q16 32639.f   /* 127 * 256 + 127: both planes fit int8 */

static void quantize_row_q16(const float *x, int K, int Gp, xq_t *r) {
    int G = K / 32;
    for (int g = 0; g < Gp; g++) {
        float amax = 0.f, sum = 0.f;
        if (g < G) for (int i = 0; i < 32; i++) { float a = fabsf(x[g * 32 + i]); amax = a > amax ? a : amax; sum += x[g * 32 + i]; }
        float sc = amax / Q16, inv = amax > 0.f ? Q16 / amax : 0.f;
        for (int i = 0; i < 32; i++) {
            int q = g < G ? (int)nearbyintf(x[g * 32 + i] * inv) : 0;
            int a = (q + 128) >> 8, b = q - 256 * a;          /* q = 256 a + b, both in [-128, 127] */
            int at = g * 16 + (i & 15);
            if (i < 16) { r->alo[at] = (int8_t)a; r->blo[at] = (int8_t)b; }
            else { r->ahi[at] = (int8_t)a; r->bhi[at] = (int8_t)b; }
        }
        for (int l = 0; l < 4; l++) { r->xs4[g * 4 + l] = sc; r->sum4[g * 4 + l] = sum * 0.25f; }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* JR weight rows x MR activation rows over the whole K, accumulators in registers: JR * MR independent chains keep
 * the FMA latency hidden (a loop over a runtime row count kept them in memory: 3x slower). */
#ifndef I4_AHEAD
#define I4_AHEAD 6144      /* bytes of weights prefetched ahead: the bus stays busy (10 -> 35-45 GB/s) */
#endif
#define I4_TILE(JR, MR)                                                                                              \
static void i4_tile_##JR##_##MR(const uint8_t *w4, const f16 *sm, const xq_t *rows, int n0, int K, int G, int Gp, \
                                float *out, int N) {                                                                 \
    const __m512i low4 = _mm512_set1_epi8(15);                                                                       \
    const __m512i pick_s = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);                         \
    const __m512i pick_m = _mm512_set_epi32(7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1);                         \
    __m512 acc[JR][MR];                                                                                              \
    for (int j = 0; j < JR; j++) for (int m = 0; m < MR; m++) acc[j][m] = _mm512_setzero_ps();                      \
    const int ahead = I4_AHEAD / (K / 2) > JR ? I4_AHEAD / (K / 2) : JR;      /* rows ~I4_AHEAD bytes on */          \
    for (int c = 0; c < Gp / 4; c++) {                                                                               \
        int left = G - 4 * c;                                  /* groups of this chunk that exist: 1..4 */           \
        __mmask64 wm = left >= 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * left)) - 1);                             \
        __mmask8 km = left >= 4 ? 0xFF : (__mmask8)((1u << (2 * left)) - 1);                                         \
        for (int j = 0; j < JR; j++) {                                                                               \
            const uint8_t *wr = w4 + (int64_t)(n0 + j) * (K / 2) + c * 64;                                           \
            const f16 *sr = sm + ((int64_t)(n0 + j) * G + 4 * c) * 2;                                               \
            _mm_prefetch((const char *)(wr + ahead * (K / 2)), _MM_HINT_T0);  /* the same chunk, rows ahead */      \
            _mm_prefetch((const char *)(sr + ahead * G * 2), _MM_HINT_T0);                                          \
            __m512i v = _mm512_maskz_loadu_epi8(wm, wr);                                                             \
            __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);            \
            /* (scale, min) of the chunk's groups, fp16 -> fp32, each spread over its group's 4 lanes */             \
            __m512 p = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_maskz_loadu_epi16(km, sr)));                      \
            __m512 sc = _mm512_permutexvar_ps(pick_s, p), mn = _mm512_permutexvar_ps(pick_m, p);                     \
            for (int m = 0; m < MR; m++) {                                                                           \
                const xq_t *r = &rows[m];                                                                            \
                __m512i da = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(r->alo + c * 64));    \
                da = _mm512_dpbusd_epi32(da, hi, _mm512_load_si512(r->ahi + c * 64));                                \
                __m512i db = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(r->blo + c * 64));    \
                db = _mm512_dpbusd_epi32(db, hi, _mm512_load_si512(r->bhi + c * 64));                                \
                __m512i d = _mm512_add_epi32(_mm512_slli_epi32(da, 8), db);                                          \
                __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_load_ps(r->xs4 + c * 16));                    \
                acc[j][m] = _mm512_fmadd_ps(f, sc, acc[j][m]);                                                       \
                acc[j][m] = _mm512_fmadd_ps(mn, _mm512_load_ps(r->sum4 + c * 16), acc[j][m]);                        \
            }                                                                                                        \
        }                                                                                                            \
    }                                                                                                                \
    for (int j = 0; j < JR; j++)                                                                                     \
        for (int m = 0; m < MR; m++) out[(int64_t)m * N + n0 + j] = _mm512_reduce_add_ps(acc[j][m]);                 \
}
I4_TILE(8, 1)
I4_TILE(4, 2)
I4_TILE(4, 4)
I4_TILE(1, 1)
I4_TILE(1, 2)
I4_TILE(1, 4)
#endif

/* out rows [m0, m0 + MR) x weight rows [n0, n1) */
static void i4_rows(const uint8_t *w4, const f16 *sm, const xq_t *rows, int n0, int n1, int K, float *out, int N,
                    int mr) {
    int G = K / 32, Gp = (G + 3) / 4 * 4;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    int jr = mr == 1 ? 8 : 4, n = n0;
    for (; n + jr <= n1; n += jr) {
        if (mr == 1) i4_tile_8_1(w4, sm, rows, n, K, G, Gp, out, N);
        else if (mr == 2) i4_tile_4_2(w4, sm, rows, n, K, G, Gp, out, N);
        else i4_tile_4_4(w4, sm, rows, n, K, G, Gp, out, N);
    }
    for (; n < n1; n++) {
        if (mr == 1) i4_tile_1_1(w4, sm, rows, n, K, G, Gp, out, N);
        else if (mr == 2) i4_tile_1_2(w4, sm, rows, n, K, G, Gp, out, N);
        else i4_tile_1_4(w4, sm, rows, n, K, G, Gp, out, N);
    }
#else
    (void)Gp;
    for (int m = 0; m < mr; m++)
        for (int n = n0; n < n1; n++) {
            const uint8_t *wr = w4 + (int64_t)n * (K / 2);
            const f16 *sr = sm + (int64_t)n * G * 2;
            const xq_t *r = &rows[m];
            float acc = 0.f;
            for (int g = 0; g < G; g++) {
                int32_t d = 0;
                for (int i = 0; i < 16; i++) {
                    uint8_t b = wr[g * 16 + i];
                    int at = g * 16 + i;
                    d += (int32_t)(b & 15) * (256 * r->alo[at] + r->blo[at]) + (int32_t)(b >> 4) * (256 * r->ahi[at] + r->bhi[at]);
                }
                acc += (float)d * r->xs4[g * 4] * h2f(sr[2 * g]) + h2f(sr[2 * g + 1]) * 4.f * r->sum4[g * 4];
            }
            out[(int64_t)m * N + n] = acc;
        }
#endif
}

void linear_i4(const void *x, int x_bf16, const uint8_t *w4, const f16 *sm, float *out, int M, int N, int K,
               int nthreads) {
    int G = K / 32, Gp = (G + 3) / 4 * 4;             /* groups, padded to whole 64-byte chunks of weights */
    size_t per = (size_t)Gp * (16 + 16 + 4 * 16);      /* xs4, sum4 (4 floats a group each), 4 planes (16 bytes) */
    char *buf = aligned_alloc(64, (size_t)M * per);
    xq_t *rows = malloc(sizeof(xq_t) * (size_t)M);
    float *xrow = malloc(sizeof(float) * (size_t)K);
    for (int m = 0; m < M; m++) {
        char *b = buf + (size_t)m * per;
        rows[m].xs4 = (float *)b;
        rows[m].sum4 = (float *)(b + (size_t)Gp * 16);
        rows[m].alo = (int8_t *)(b + (size_t)Gp * 32);
        rows[m].ahi = (int8_t *)(b + (size_t)Gp * 48);
        rows[m].blo = (int8_t *)(b + (size_t)Gp * 64);
        rows[m].bhi = (int8_t *)(b + (size_t)Gp * 80);
        load_row(x, x_bf16, (int64_t)m * K, K, xrow);
        quantize_row_q16(xrow, K, Gp, &rows[m]);
    }
    free(xrow);
    int64_t blocks = (N + 63) / 64;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int n0 = (int)(blk * 64), n1 = N - n0 < 64 ? N : n0 + 64;
        for (int m0 = 0; m0 < M; ) {
            int mr = M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;
            i4_rows(w4, sm, rows + m0, n0, n1, K, out + (int64_t)m0 * N, N, mr);
            m0 += mr;
        }
    }
    free(rows);
    free(buf);
}

/* The bf16 [N, K] weight that linear_i4's w4/sm represent (prefill: many rows take torch's bf16 matmul). */
void dequant_i4(const uint8_t *w4, const f16 *sm, bf16 *out, int N, int K, int nthreads) {
    int G = K / 32;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int n = 0; n < N; n++) {
        const uint8_t *wr = w4 + (int64_t)n * (K / 2);
        const f16 *sr = sm + (int64_t)n * G * 2;
        bf16 *o = out + (int64_t)n * K;
        for (int g = 0; g < G; g++) {
            float sc = h2f(sr[2 * g]), mn = h2f(sr[2 * g + 1]);
            for (int i = 0; i < 16; i++) {
                uint8_t b = wr[g * 16 + i];
                o[g * 32 + i] = f2bf((float)(b & 15) * sc + mn);
                o[g * 32 + 16 + i] = f2bf((float)(b >> 4) * sc + mn);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ layer glue */

/* qkv [N, (H + 2 KVH) D] (fp32 or bf16) of N tokens; token i belongs to store row slot[i] at position pos[i].
 * Adds bias (fp32, may be NULL), applies q_norm/k_norm (fp32 [D], may be NULL; eps) per head, RoPE with
 * cos/sin tables [P, D/2] (rotate-half convention), writes q (fp32 [N, H, D]) and the K/V rows into the store
 * (kbase/vbase: the layer's [slots, KVH, T, D] view; strides ss, sh in elements). */
void qkv_post(const void *qkv, int qkv_bf16, const float *bias, const float *qnw, const float *knw, float eps,
              const float *cos_t, const float *sin_t, const int64_t *slot, const int64_t *pos, float *q_out,
              void *kbase, void *vbase, int kv_bf16, int64_t ss, int64_t sh, int N, int H, int KVH, int D) {
    int W = (H + 2 * KVH) * D, half = D / 2;
    for (int i = 0; i < N; i++) {
        float row[4096];                      /* one token's (H + 2 KVH) * D values; larger models use the heap */
        float *r = row;
        float *heap = NULL;
        if (W > (int)(sizeof(row) / 4)) r = heap = malloc(sizeof(float) * (size_t)W);
        load_row(qkv, qkv_bf16, (int64_t)i * W, W, r);
        if (bias) for (int c = 0; c < W; c++) r[c] += bias[c];
        const float *ct = cos_t + pos[i] * half, *st = sin_t + pos[i] * half;
        for (int hh = 0; hh < H + KVH; hh++) {          /* q heads, then k heads: norm + rope */
            float *x = r + hh * D;
            const float *nw = hh < H ? qnw : knw;
            if (nw) {
                float ss2 = 0.f;
                for (int d = 0; d < D; d++) ss2 += x[d] * x[d];
                float inv = 1.f / sqrtf(ss2 / D + eps);
                for (int d = 0; d < D; d++) x[d] = x[d] * inv * nw[d];
            }
            for (int d = 0; d < half; d++) {
                float a = x[d], b = x[d + half];
                x[d] = a * ct[d] - b * st[d];
                x[d + half] = b * ct[d] + a * st[d];
            }
        }
        memcpy(q_out + (int64_t)i * H * D, r, sizeof(float) * (size_t)H * D);
        for (int h = 0; h < KVH; h++) {
            int64_t off = slot[i] * ss + h * sh + pos[i] * D;
            store_row(kbase, kv_bf16, off, D, r + (H + h) * D);
            store_row(vbase, kv_bf16, off, D, r + (H + KVH + h) * D);
        }
        free(heap);
    }
}

/* h [N, C] fp32 += delta (fp32 or bf16, may be NULL); out [N, C] = rmsnorm(h) * w, fp32 or bf16. */
void add_rmsnorm(float *h, const void *delta, int delta_bf16, const float *w, float eps, void *out, int out_bf16,
                 int N, int C) {
    for (int i = 0; i < N; i++) {
        float *x = h + (int64_t)i * C;
        if (delta) {
            if (delta_bf16) { const bf16 *dl = (const bf16 *)delta + (int64_t)i * C; for (int c = 0; c < C; c++) x[c] += bf2f(dl[c]); }
            else { const float *dl = (const float *)delta + (int64_t)i * C; for (int c = 0; c < C; c++) x[c] += dl[c]; }
        }
        float ss2 = 0.f;
        for (int c = 0; c < C; c++) ss2 += x[c] * x[c];
        float inv = 1.f / sqrtf(ss2 / C + eps);
        if (out_bf16) { bf16 *o = (bf16 *)out + (int64_t)i * C; for (int c = 0; c < C; c++) o[c] = f2bf(x[c] * inv * w[c]); }
        else { float *o = (float *)out + (int64_t)i * C; for (int c = 0; c < C; c++) o[c] = x[c] * inv * w[c]; }
    }
}

/* gu [N, 2I] (gate | up, fp32 or bf16) -> out [N, I] = silu(gate) * up (fp32 or bf16). */
void silu_mul(const void *gu, int in_bf16, void *out, int out_bf16, int N, int I) {
    float g[1024], u[1024];
    for (int i = 0; i < N; i++) {
        for (int c0 = 0; c0 < I; c0 += 1024) {
            int nc = I - c0 < 1024 ? I - c0 : 1024;
            load_row(gu, in_bf16, (int64_t)i * 2 * I + c0, nc, g);
            load_row(gu, in_bf16, (int64_t)i * 2 * I + I + c0, nc, u);
            for (int c = 0; c < nc; c++) g[c] = g[c] / (1.f + expf(-g[c])) * u[c];
            store_row(out, out_bf16, (int64_t)i * I + c0, nc, g);
        }
    }
}

/* The refinement's candidate keys, kept gathered (selection/candidate_keys.py): for every entry j of the lists
 * cand [B, KVH, W] (positions, < 0 for none) that the buffer does not hold (held[j] != cand[j]), copy the key row
 * at cand[j] of row b's head h (k: the layer's [B, KVH, T, D] view, strides sb, sh in elements, rows of D
 * elements of ``esize`` bytes) to dst [B, KVH, W, D] (contiguous) and record held[j] = cand[j], or -3 where the
 * position is not written yet (cand[j] >= len[b]: copied again next time). Positions in a list come in whole pages:
 * consecutive rows are copied as one run, and the next run is prefetched while this one is copied (runs lie at
 * random places in the cache: each is a fresh memory latency). Returns the key rows copied; ``pending``: how many of
 * them are not written yet (held -3). */
static inline int stale_entry(const int64_t *held, const int64_t *cand, int64_t j) {   /* a key to copy */
    return cand[j] >= 0 && held[j] != cand[j];
}

int64_t gather_candidates(const void *k, int64_t sb, int64_t sh, int esize, const int64_t *cand, int64_t *held,
                          const int64_t *len, void *dst, int B, int KVH, int64_t W, int64_t R, int D,
                          int64_t *pending, int nthreads) {
    const int64_t PIECE = 512;                   /* entries per work item */
    int64_t pieces = (W + PIECE - 1) / PIECE, copied = 0, waiting = 0, row = (int64_t)D * esize;
    #pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : copied, waiting)
    for (int64_t it = 0; it < (int64_t)B * KVH * pieces; it++) {
        int64_t bh = it / pieces, j0 = it % pieces * PIECE, j1 = j0 + PIECE < W ? j0 + PIECE : W;
        int b = (int)(bh / KVH), h = (int)(bh % KVH);
        const int64_t *c = cand + bh * W;
        int64_t *hd = held + bh * R;                 /* held and dst: R entries per (row, head), W of them used */
        const char *src = (const char *)k + (b * sb + h * sh) * esize;
        char *out = (char *)dst + bh * R * row;
        for (int64_t j = j0; j < j1;) {
            if (!stale_entry(hd, c, j)) { hd[j] = c[j]; j++; continue; }
            int64_t e = j + 1;
            while (e < j1 && c[e] == c[e - 1] + 1 && stale_entry(hd, c, e)) e++;
            int64_t f = e;                       /* the next run to copy: ask for its lines now */
            while (f < j1 && !stale_entry(hd, c, f)) f++;
            if (f < j1) {
                int64_t g = f + 1;
                while (g < j1 && g - f < 32 && c[g] == c[g - 1] + 1) g++;
                for (int64_t x = 0; x < (g - f) * row; x += 64) __builtin_prefetch(src + c[f] * row + x, 0, 3);
            }
            memcpy(out + j * row, src + c[j] * row, (size_t)((e - j) * row));
            for (int64_t x = j; x < e; x++) { hd[x] = c[x] < len[b] ? c[x] : -3; waiting += hd[x] == -3; }
            copied += e - j;
            j = e;
        }
    }
    *pending = waiting;
    return copied;
}

/* Fold one key row into its page's min/max (``first``: the page's first token, which starts them). */
static void fold_page(const void *krow, void *mn, void *mx, int bf, int first, int D) {
    if (bf) {
        const bf16 *kr = krow;
        bf16 *lo = mn, *hi = mx;
        for (int d = 0; d < D; d++) {
            float x = bf2f(kr[d]);
            if (first || x < bf2f(lo[d])) lo[d] = kr[d];
            if (first || x > bf2f(hi[d])) hi[d] = kr[d];
        }
    } else {
        const float *kr = krow;
        float *lo = mn, *hi = mx;
        for (int d = 0; d < D; d++) {
            if (first || kr[d] < lo[d]) lo[d] = kr[d];
            if (first || kr[d] > hi[d]) hi[d] = kr[d];
        }
    }
}

/* Quest page bounds after a decode write: row b wrote the key at position start[b]; page start[b] / page of each
 * KV head takes that key as its min and max when it is the page's first token, else folds it in. k: the layer's
 * [B, KVH, T, D] view (strides sb, sh); pmin/pmax: [B, KVH, pages, D] views (strides pb, ph), same dtype as k. */
void page_append(const void *k, void *pmin, void *pmax, int bf, int64_t sb, int64_t sh, int64_t pb, int64_t ph,
                 const int64_t *start, int B, int KVH, int D, int page) {
    int es = bf ? 2 : 4;
    for (int b = 0; b < B; b++) {
        int64_t t = start[b], p = t / page;
        for (int h = 0; h < KVH; h++) {
            int64_t ko = b * sb + h * sh + t * D, po = b * pb + h * ph + p * D;
            fold_page((const char *)k + ko * es, (char *)pmin + po * es, (char *)pmax + po * es, bf, t % page == 0, D);
        }
    }
}

/* ------------------------------------------------------------------------------------------------ a layer's glue */

/* One projection in a C-kernel format (decode rows, fp32 in and out): fmt 8 = linear_i8 (w int8, s fp32 scales),
 * fmt 4 = linear_i4 (w packed nibbles, s fp16 scale/min pairs). */
typedef struct { int64_t fmt, N, K; const void *w, *s; } lin_t;

static void lin_apply(const lin_t *l, const float *x, float *out, int M, int nthreads) {
    if (l->fmt == 8) linear_i8(x, 0, (const int8_t *)l->w, (const float *)l->s, out, M, (int)l->N, (int)l->K, nthreads);
    else linear_i4(x, 0, (const uint8_t *)l->w, (const f16 *)l->s, out, M, (int)l->N, (int)l->K, nthreads);
}

/* Before attention, M decode rows: qkv = x W_qkv^T, then qkv_post (its arguments as there). One call instead of
 * two: each Python -> C call costs microseconds, ~10 of them a layer. */
void layer_pre(const lin_t *qkv, const float *x, float *qkv_buf, int M, const float *bias, const float *qnw,
               const float *knw, float eps, const float *cos_t, const float *sin_t, const int64_t *slot,
               const int64_t *pos, float *q_out, void *kbase, void *vbase, int kv_bf16, int64_t ss, int64_t sh,
               void *pmin, void *pmax, int64_t pss, int64_t psh, int page, int H, int KVH, int D, int nthreads) {
    lin_apply(qkv, x, qkv_buf, M, nthreads);
    qkv_post(qkv_buf, 0, bias, qnw, knw, eps, cos_t, sin_t, slot, pos, q_out, kbase, vbase, kv_bf16, ss, sh, M, H,
             KVH, D);
    if (!pmin) return;          /* the store keeps Quest page bounds: fold the new keys in (page_append's work) */
    int es = kv_bf16 ? 2 : 4;
    for (int i = 0; i < M; i++)
        for (int h = 0; h < KVH; h++) {
            int64_t ko = slot[i] * ss + h * sh + pos[i] * D, po = slot[i] * pss + h * psh + pos[i] / page * D;
            fold_page((char *)kbase + ko * es, (char *)pmin + po * es, (char *)pmax + po * es, kv_bf16,
                      pos[i] % page == 0, D);
        }
}

/* After attention, M decode rows (h the fp32 residual [M, C], attn [M, H D] fp32):
 *   h += attn W_o^T; x = rmsnorm(h) w_mlp; gu = x W_gu^T; act = silu(gate) up; h += act W_down^T;
 *   x = rmsnorm(h) w_next.  buf: M (C + 2 I + I + C) floats of scratch. */
void layer_post(const lin_t *o, const lin_t *gate_up, const lin_t *down, float *h, const float *attn, float *x,
                const float *w_mlp, const float *w_next, float eps, float *buf, int M, int nthreads) {
    int C = (int)o->N, I = (int)down->K;
    float *o_out = buf, *gu = o_out + (int64_t)M * C, *act = gu + (int64_t)M * 2 * I, *d_out = act + (int64_t)M * I;
    lin_apply(o, attn, o_out, M, nthreads);
    add_rmsnorm(h, o_out, 0, w_mlp, eps, x, 0, M, C);
    lin_apply(gate_up, x, gu, M, nthreads);
    silu_mul(gu, 0, act, 0, M, I);
    lin_apply(down, act, d_out, M, nthreads);
    add_rmsnorm(h, d_out, 0, w_next, eps, x, 0, M, C);
}
