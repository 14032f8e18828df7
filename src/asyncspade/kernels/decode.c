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
#define BLOCK 64      /* positions scored at once (exp and max over a block vectorize) */

/* ------------------------------------------------------------------------------------------------ attention */

/* Partial attention of one (row, KV head) over positions pos[0..n) (or begin..begin+n when pos is NULL):
 * running max m[g], sum l[g], unnormalised output acc[g][D]. Templated on the store dtype for the inner loops. */
#define PARTIAL(NAME, T, CONV)                                                                                   \
static void NAME(const float *q, const T *K, const T *V, const int64_t *pos, const uint8_t *valid, int64_t begin, \
                 int64_t n, int G, int D, float scale, float *m, float *l, float *acc) {                       \
    float s[MAXG][BLOCK];                                                                                      \
    for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; }                                              \
    memset(acc, 0, sizeof(float) * (size_t)G * D);                                                             \
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {                                                                \
        int nb = (int)(n - j0 < BLOCK ? n - j0 : BLOCK);                                                       \
        for (int j = 0; j < nb; j++) {                                                                         \
            int64_t p = pos ? pos[j0 + j] : begin + j0 + j;                                                    \
            const T *kr = K + p * D;                                                                           \
            float kf[MAXD];                                                                                    \
            for (int d = 0; d < D; d++) kf[d] = CONV(kr[d]);                                                   \
            int ok = !valid || valid[j0 + j];                                                                  \
            for (int g = 0; g < G; g++) {                                                                      \
                const float *qg = q + g * D;                                                                   \
                float dot = 0.f;                                                                               \
                for (int d = 0; d < D; d++) dot += qg[d] * kf[d];                                              \
                s[g][j] = ok ? dot * scale : -INFINITY;                                                        \
            }                                                                                                  \
        }                                                                                                      \
        for (int g = 0; g < G; g++) {                                                                          \
            float mx = m[g];                                                                                   \
            for (int j = 0; j < nb; j++) mx = s[g][j] > mx ? s[g][j] : mx;                                     \
            if (mx == -INFINITY) { for (int j = 0; j < nb; j++) s[g][j] = 0.f; continue; }                    \
            float alpha = expf(m[g] - mx);                                                                     \
            float sum = 0.f;                                                                                   \
            for (int j = 0; j < nb; j++) { float e = expf(s[g][j] - mx); s[g][j] = e; sum += e; }              \
            l[g] = l[g] * alpha + sum;                                                                         \
            m[g] = mx;                                                                                         \
            if (alpha != 1.f) for (int d = 0; d < D; d++) acc[g * D + d] *= alpha;                            \
        }                                                                                                      \
        for (int j = 0; j < nb; j++) {                                                                         \
            int64_t p = pos ? pos[j0 + j] : begin + j0 + j;                                                    \
            const T *vr = V + p * D;                                                                           \
            float vf[MAXD];                                                                                    \
            for (int d = 0; d < D; d++) vf[d] = CONV(vr[d]);                                                   \
            for (int g = 0; g < G; g++) {                                                                      \
                float w = s[g][j];                                                                             \
                float *a = acc + g * D;                                                                        \
                for (int d = 0; d < D; d++) a[d] += w * vf[d];                                                 \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
}

static inline float id_f32(float x) { return x; }
PARTIAL(partial_bf16, bf16, bf2f)
PARTIAL(partial_f32, float, id_f32)

/* q:      [B, KVH, G, D] fp32 (contiguous)
 * k, v:   the store's [B, KVH, T, D] view of one layer (row stride D), strides sb, sh in elements
 * begin, end: [B] positions attended (dense or window) when idx is NULL
 * idx:    [B, KVH, n_idx] positions (sparse), strides ib, ih; valid: same layout (or NULL)
 * out:    [B, KVH, G, D], fp32 or bf16 (out_bf16)
 * chunk:  positions per work item (the sequence split across threads) */
void attend(const float *q, const void *k, const void *v, int kv_bf16, int64_t sb, int64_t sh,
            const int64_t *begin, const int64_t *end, const int64_t *idx, const uint8_t *valid, int64_t n_idx,
            int64_t ib, int64_t ih, void *out, int out_bf16, int B, int KVH, int G, int D, float scale,
            int64_t chunk, int nthreads) {
    /* work items: (b, h, c) for every chunk c of row b's positions */
    int64_t *first = malloc(sizeof(int64_t) * (B + 1));
    first[0] = 0;
    for (int b = 0; b < B; b++) {
        int64_t n = idx ? n_idx : end[b] - begin[b];
        if (n < 0) n = 0;
        int64_t nc = (n + chunk - 1) / chunk;
        if (nc < 1) nc = 1;
        first[b + 1] = first[b] + nc * KVH;
    }
    int64_t items = first[B];
    int stride = G * (D + 2);
    float *part = malloc(sizeof(float) * (size_t)items * stride);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t it = 0; it < items; it++) {
        int b = 0;
        while (first[b + 1] <= it) b++;
        int64_t local = it - first[b];
        int64_t nc = (first[b + 1] - first[b]) / KVH;
        int h = (int)(local / nc);
        int64_t c = local % nc;
        int64_t n = idx ? n_idx : end[b] - begin[b];
        int64_t lo = c * chunk, hi = lo + chunk < n ? lo + chunk : n;
        float *pm = part + it * stride, *pl = pm + G, *pa = pl + G;
        const float *qh = q + ((int64_t)b * KVH + h) * G * D;
        const int64_t *pos = idx ? idx + b * ib + h * ih + lo : NULL;
        const uint8_t *val = (idx && valid) ? valid + b * ib + h * ih + lo : NULL;
        int64_t base = b * sb + h * sh;
        int64_t cnt = hi > lo ? hi - lo : 0;
        if (kv_bf16)
            partial_bf16(qh, (const bf16 *)k + base, (const bf16 *)v + base, pos, val, idx ? 0 : begin[b] + lo, cnt,
                         G, D, scale, pm, pl, pa);
        else
            partial_f32(qh, (const float *)k + base, (const float *)v + base, pos, val, idx ? 0 : begin[b] + lo, cnt,
                        G, D, scale, pm, pl, pa);
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

/* Aggregated probability of candidate keys, for top-k selection.
 * q [B, KVH, G, D] fp32; keys: the store view as in attend; candidates: positions [lo, lo + n) masked beyond
 * hi[b] (idx NULL), or idx [B, KVH, n] with valid (may be NULL); out [B, KVH, n] fp32. agg_max: max over the
 * group instead of sum. Masked candidates get -1 (below any probability). */
void score(const float *q, const void *k, int kv_bf16, int64_t sb, int64_t sh, int64_t lo, const int64_t *hi,
           const int64_t *idx, const uint8_t *valid, int64_t n, int64_t ib, int64_t ih, float *out, int B, int KVH,
           int G, int D, float scale, int agg_max, int nthreads) {
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t bh = 0; bh < (int64_t)B * KVH; bh++) {
        int b = (int)(bh / KVH), h = (int)(bh % KVH);
        const float *qh = q + bh * G * D;
        const int64_t *pos = idx ? idx + b * ib + h * ih : NULL;
        const uint8_t *val = (idx && valid) ? valid + b * ib + h * ih : NULL;
        int64_t base = b * sb + h * sh;
        float *o = out + bh * n;
        float *s = malloc(sizeof(float) * (size_t)G * n);
        float mx[MAXG], sum[MAXG];
        for (int g = 0; g < G; g++) { mx[g] = -INFINITY; sum[g] = 0.f; }
        for (int64_t j = 0; j < n; j++) {
            int64_t p = pos ? pos[j] : lo + j;
            int ok = pos ? (!val || val[j]) : (p < hi[b]);
            float kf[MAXD];
            if (ok) load_row(k, kv_bf16, base + p * D, D, kf);
            for (int g = 0; g < G; g++) {
                float dot = 0.f;
                if (ok) { const float *qg = qh + g * D; for (int d = 0; d < D; d++) dot += qg[d] * kf[d]; }
                float x = ok ? dot * scale : -INFINITY;
                s[g * n + j] = x;
                mx[g] = x > mx[g] ? x : mx[g];
            }
        }
        for (int g = 0; g < G; g++) {
            float *sg = s + g * n;
            if (mx[g] == -INFINITY) continue;
            float acc = 0.f;
            for (int64_t j = 0; j < n; j++) { float e = expf(sg[j] - mx[g]); sg[j] = e; acc += e; }
            sum[g] = acc;
        }
        for (int64_t j = 0; j < n; j++) {
            int64_t p = pos ? pos[j] : lo + j;
            int ok = pos ? (!val || val[j]) : (p < hi[b]);
            float a = 0.f;
            for (int g = 0; g < G; g++) {
                float pr = sum[g] > 0.f ? s[g * n + j] / sum[g] : 0.f;
                a = agg_max ? (pr > a ? pr : a) : a + pr;
            }
            o[j] = ok ? a : -1.f;
        }
        free(s);
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
