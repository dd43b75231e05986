/* grouped.c — group-wise scales (.spfq format version 3, `compress --group-size G`): one scale
 * (and lam) per (output row, group of G consecutive columns of K), the semantics written in
 * spfq_kernels.h (spfq_grouped_*).
 *
 * Two routes, the same bits (spfq_kernels.h's one evaluation order):
 *   fused (x86-64, int8 activations, no lam, G a whole number of RP steps): one weight set over
 *   all K columns (per-row scale 1, SPARSE re-encoded as PLANES) whose RP codes the fused
 *   grouped kernels (intb_avx512.c / intb_avx2.c) read once per call, turning each group's int32
 *   sum into its float term in registers (gscale, one per row and group). SmolLM2 decode with
 *   G = 32 was 56 tok/s through the per-group route below, which re-reads the activations and
 *   writes and re-reads the (m, N) partial outputs once per group.
 *   per group (every other case, and the float path): the weights cut into one per-row-scale
 *   weight set per group (the group's columns re-encoded word-aligned, its scales as the
 *   per-row scales, no bias), so a call runs the existing kernels, every ISA's, on each group's
 *   columns and adds their float outputs in ascending group order; bias, clamp and activation
 *   come after the sum. Built at prepare time when there is no fused route, else on first use
 *   (a float call, or an ISA switched to one without the fused kernel). The int8 kernels and
 *   epilogue of every ISA are bit-identical with the C oracle, so this route is too; the float
 *   path runs spfq_matmul_f32_oracle (api.c: the output-lane tables, the oracle's order at any
 *   row count). SPARSE weights are cut into PLANES groups (the same values, lam kept).
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct spfq_grouped {
    int32_t n, k, group, ngroups;
    int layout, bits;             /* of the cut weight sets: SPARSE as PLANES */
    spfq_prepared *full;          /* the fused route's weight set (gscale), or NULL */
    spfq_prepared **_Atomic sub;  /* ngroups weight sets of K_g = min(G, K - g G) columns, or NULL
                                     until built (always built when full is NULL) */
    pthread_mutex_t sub_mu;
    float *scale, *lam;           /* (N, ngroups): for cutting the groups */
    float *bias;                  /* (N) or NULL */
    int32_t clamped;
    float clamp_lo, clamp_hi;
    int32_t act;
    float *act_slope;
};

static void free_subs(spfq_prepared **sub, int32_t ng) {
    for (int32_t g = 0; sub && g < ng; g++) spfq_free(sub[g]);
    free(sub);
}

void spfq_grouped_free(spfq_grouped *p) {
    if (!p) return;
    free_subs(p->sub, p->ngroups);
    spfq_free(p->full);
    pthread_mutex_destroy(&p->sub_mu);
    free(p->scale);
    free(p->lam);
    free(p->bias);
    free(p->act_slope);
    free(p);
}

/* Columns [c0, c0 + Kg) of the codes c (N rows of K) as a weight set of layout L with per-row
 * scale / lam (N values each, lam may be NULL) and bias (or NULL). */
static int cut_cols(int L, int bits, int32_t N, int32_t K, const int8_t *codes, int32_t c0, int32_t Kg,
                    const float *scale, const float *lam, const float *bias, spfq_prepared **out) {
    const int32_t W = SPFQ_WORDS(Kg);
    uint64_t *sign = L != SPFQ_PLANES ? calloc((size_t)N * W, 8) : NULL;
    uint64_t *mask = L == SPFQ_SIGN_MASK ? calloc((size_t)N * W, 8) : NULL;
    uint64_t *planes = L == SPFQ_PLANES ? calloc((size_t)bits * N * W, 8) : NULL;
    int rc = SPFQ_ENOMEM;
    if ((L == SPFQ_PLANES ? planes != NULL : sign != NULL) && (L != SPFQ_SIGN_MASK || mask)) {
        for (int32_t n = 0; n < N; n++)
            spfq_encode_row(L, bits, codes + (size_t)n * K + c0, Kg, W, sign ? sign + (size_t)n * W : NULL,
                            mask ? mask + (size_t)n * W : NULL, planes ? planes + (size_t)n * W : NULL, (size_t)N * W);
        spfq_weights_desc d = {.layout = L, .n = N, .k = Kg, .bits = L == SPFQ_PLANES ? bits : (L == SPFQ_SIGN ? 1 : 2),
                               .sign = sign, .mask = mask, .planes = planes, .scale = scale, .lam = lam, .bias = bias};
        rc = spfq_prepare(&d, out);
    }
    free(sign);
    free(mask);
    free(planes);
    return rc;
}

/* Signed codes (N x K) of a weight set of any layout. */
static void all_codes(const spfq_prepared *w, int8_t *codes) {
    for (int32_t n = 0; n < w->d.n; n++) spfq_row_codes(w, n, codes + (size_t)n * w->d.k);
}

/* The per-group weight sets from the codes. */
static int cut_groups(const spfq_grouped *p, const int8_t *codes, spfq_prepared ***out) {
    const int32_t N = p->n, K = p->k, G = p->group, ng = p->ngroups;
    spfq_prepared **sub = calloc((size_t)ng, sizeof *sub);
    float *scale = malloc((size_t)N * 4), *lam = p->lam ? malloc((size_t)N * 4) : NULL;
    int rc = (sub && scale && (!p->lam || lam)) ? SPFQ_OK : SPFQ_ENOMEM;
    for (int32_t g = 0; g < ng && rc == SPFQ_OK; g++) {
        for (int32_t n = 0; n < N; n++) {
            scale[n] = p->scale[(size_t)n * ng + g];
            if (lam) lam[n] = p->lam[(size_t)n * ng + g];
        }
        const int32_t c0 = g * G, Kg = (K - c0) < G ? K - c0 : G;
        rc = cut_cols(p->layout, p->bits, N, K, codes, c0, Kg, scale, lam, NULL, &sub[g]);
    }
    free(scale);
    free(lam);
    if (rc) {
        free_subs(sub, ng);
        return rc;
    }
    *out = sub;
    return SPFQ_OK;
}

/* The per-group weight sets, built from the fused route's codes on first use. */
static spfq_prepared *const *subs(const spfq_grouped *cp) {
    spfq_grouped *p = (spfq_grouped *)cp; /* a cache, not part of the weights' value */
    spfq_prepared **have = atomic_load_explicit(&p->sub, memory_order_acquire);
    if (have || !p->full) return have;
    pthread_mutex_lock(&p->sub_mu);
    if (!p->sub) {
        int8_t *codes = malloc((size_t)p->n * p->k);
        spfq_prepared **sub = NULL;
        if (codes) {
            all_codes(p->full, codes);
            if (cut_groups(p, codes, &sub)) sub = NULL;
        }
        free(codes);
        atomic_store_explicit(&p->sub, sub, memory_order_release);
    }
    pthread_mutex_unlock(&p->sub_mu);
    return p->sub;
}

/* The float16 bits of f when f is a float16 value (normal or subnormal, +-0), else -1. */
static int32_t half_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, e = (u >> 23) & 0xffu, m = u & 0x7fffffu;
    if (e == 0 && m == 0) return (int32_t)sign;
    const int32_t exp = (int32_t)e - 127;
    if (e == 0xffu || exp > 15 || exp < -24) return -1;
    if (exp >= -14) /* normal: 10 mantissa bits */
        return (m & 0x1fffu) ? -1 : (int32_t)(sign | (uint32_t)(exp + 15) << 10 | m >> 13);
    const uint32_t full = m | 0x800000u, shift = (uint32_t)(-14 - exp) + 13; /* subnormal: k 2^-24 */
    return (full & ((1u << shift) - 1)) ? -1 : (int32_t)(sign | full >> shift);
}

/* The fused route's weight set: all columns, scale 1, the bias, gscale from the group scales;
 * NULL (not an error) when the route does not apply here (no RP codes, G not whole RP steps,
 * too many groups, lam, a scale that is not a float16 value). */
static spfq_prepared *fused_set(const spfq_grouped *p, const int8_t *codes, const float *ones) {
    if (p->lam) return NULL;
    const int32_t N = p->n, ng = p->ngroups;
    spfq_prepared *w = NULL;
    if (cut_cols(p->layout, p->bits, N, p->k, codes, 0, p->k, ones, NULL, p->bias, &w)) w = NULL;
    const int32_t kstep = w && w->rp ? 4 * (8 / w->rp_cb) : 0;
    if (!kstep || p->group % kstep || ng > SPFQ_GROUPED_MAX_GROUPS ||
        !(w->gscale = calloc((size_t)(N + 15) / 16 * ng * 16, sizeof *w->gscale))) {
        spfq_free(w);
        return NULL;
    }
    for (int32_t n = 0; n < N; n++)
        for (int32_t g = 0; g < ng; g++) {
            const int32_t h = half_bits(p->scale[(size_t)n * ng + g]);
            if (h < 0) {
                spfq_free(w);
                return NULL;
            }
            w->gscale[((size_t)(n / 16) * ng + g) * 16 + n % 16] = (uint16_t)h;
        }
    w->gsteps = p->group / kstep;
    w->ngroups = ng;
    return w;
}

int spfq_grouped_prepare(const spfq_weights_desc *w, int32_t group, spfq_grouped **out) {
    if (!w || !out || group < 1 || w->n <= 0 || w->k <= 0 || !w->scale) return SPFQ_EINVAL;
    *out = NULL;
    const int32_t ng = (int32_t)(((int64_t)w->k + group - 1) / group);
    /* the codes, decoded once through a per-row view of the weights (scale 1: also the fused
     * route's per-row scale) */
    float *ones = malloc((size_t)w->n * 4);
    if (!ones) return SPFQ_ENOMEM;
    for (int32_t n = 0; n < w->n; n++) ones[n] = 1.0f;
    spfq_weights_desc view = *w;
    view.scale = ones;
    view.lam = NULL;
    view.bias = NULL;
    spfq_prepared *whole = NULL;
    int rc = spfq_prepare(&view, &whole);
    if (rc) {
        free(ones);
        return rc;
    }
    const size_t cells = (size_t)w->n * ng;
    int8_t *codes = malloc((size_t)w->n * w->k);
    spfq_grouped *p = calloc(1, sizeof *p);
    rc = SPFQ_ENOMEM;
    if (codes && p && !pthread_mutex_init(&p->sub_mu, NULL)) {
        p->n = w->n, p->k = w->k, p->group = group, p->ngroups = ng;
        p->layout = w->layout == SPFQ_SPARSE ? SPFQ_PLANES : w->layout;
        p->bits = p->layout == SPFQ_PLANES ? w->bits : 0;
        if ((p->scale = malloc(cells * 4)) && (!w->lam || (p->lam = malloc(cells * 4))) &&
            (!w->bias || (p->bias = malloc((size_t)w->n * 4)))) {
            memcpy(p->scale, w->scale, cells * 4);
            if (w->lam) memcpy(p->lam, w->lam, cells * 4);
            if (w->bias) memcpy(p->bias, w->bias, (size_t)w->n * 4);
            all_codes(whole, codes);
            p->full = fused_set(p, codes, ones);
            spfq_prepared **sub = NULL;
            rc = p->full ? SPFQ_OK : cut_groups(p, codes, &sub);
            p->sub = sub;
        }
    } else if (p) {
        free(p);
        p = NULL;
    }
    spfq_free(whole);
    free(ones);
    free(codes);
    if (rc) {
        spfq_grouped_free(p);
        return rc;
    }
    *out = p;
    return SPFQ_OK;
}

int spfq_grouped_set_clamp(spfq_grouped *p, float lo, float hi) {
    if (!p || lo != lo || hi != hi || lo > hi) return SPFQ_EINVAL;
    if (p->full) spfq_set_clamp(p->full, lo, hi);
    p->clamped = !(lo == -INFINITY && hi == INFINITY);
    p->clamp_lo = lo;
    p->clamp_hi = hi;
    return SPFQ_OK;
}

int spfq_grouped_set_activation(spfq_grouped *p, int32_t kind, const float *slope) {
    if (!p) return SPFQ_EINVAL;
    int rc = p->full ? spfq_set_activation(p->full, kind, slope) : SPFQ_OK;
    return rc ? rc : spfq_act_set(&p->act, &p->act_slope, kind, slope, p->n);
}

/* y (m, N) = sum over groups of the kernel `run` on each group's columns of the rows (src, m x K
 * elements of `size` bytes), then bias, clamp, activation. */
typedef int (*group_fn)(const spfq_prepared *w, int32_t m, const void *x, const float *xscale, float *y,
                        int32_t nthreads);

static int run_f32(const spfq_prepared *w, int32_t m, const void *x, const float *xs, float *y, int32_t t) {
    (void)xs;
    return spfq_matmul_f32_oracle(w, m, (const float *)x, y, t);
}

static int run_i8(const spfq_prepared *w, int32_t m, const void *x, const float *xs, float *y, int32_t t) {
    return spfq_matmul_i8(w, m, (const int8_t *)x, xs, y, t);
}

static int grouped_run(const spfq_grouped *p, int32_t m, const void *src, size_t size, const float *xscale, float *y,
                       group_fn fn, int32_t nthreads) {
    const int32_t N = p->n, K = p->k, G = p->group;
    const size_t MN = (size_t)m * N;
    spfq_prepared *const *sub = subs(p);
    if (!sub) return SPFQ_ENOMEM;
    char *cols = malloc((size_t)m * (G < K ? G : K) * size);
    float *t = malloc(MN * sizeof *t);
    int rc = (cols && t) ? SPFQ_OK : SPFQ_ENOMEM;
    for (int32_t g = 0; g < p->ngroups && rc == SPFQ_OK; g++) {
        const int32_t c0 = g * G, Kg = (K - c0) < G ? K - c0 : G;
        for (int32_t r = 0; r < m; r++)
            memcpy(cols + (size_t)r * Kg * size, (const char *)src + ((size_t)r * K + c0) * size, (size_t)Kg * size);
        rc = fn(sub[g], m, cols, xscale, g ? t : y, nthreads);
        if (g)
            for (size_t i = 0; i < MN; i++) y[i] = y[i] + t[i];
    }
    free(cols);
    free(t);
    if (rc) return rc;
    const float lo = p->clamp_lo, hi = p->clamp_hi;
    for (int32_t r = 0; r < m; r++) {
        float *row = y + (size_t)r * N;
        for (int32_t n = 0; n < N; n++) {
            float v = row[n] + (p->bias ? p->bias[n] : 0.0f);
            row[n] = p->clamped ? spfq_clamp(v, lo, hi) : v;
        }
    }
    if (p->act) spfq_apply_act(p->act, p->act_slope, m, 0, N, y, (size_t)N);
    return SPFQ_OK;
}

int spfq_grouped_matmul_f32(const spfq_grouped *p, int32_t m, const float *x, float *y, int32_t nthreads) {
    if (!p || m < 0 || (m && (!x || !y))) return SPFQ_EINVAL;
    return m ? grouped_run(p, m, x, sizeof(float), NULL, y, run_f32, nthreads) : SPFQ_OK;
}

int spfq_grouped_matmul_i8(const spfq_grouped *p, int32_t m, const int8_t *xq, const float *xscale, float *y,
                           int32_t nthreads) {
    if (!p || m < 0 || (m && (!xq || !xscale || !y))) return SPFQ_EINVAL;
    if (m && p->full && spfq_grouped_fused_ok(p->full, m)) return spfq_matmul_i8(p->full, m, xq, xscale, y, nthreads);
    return m ? grouped_run(p, m, xq, 1, xscale, y, run_i8, nthreads) : SPFQ_OK;
}

int spfq_grouped_matmul_q8(const spfq_grouped *p, int32_t m, const float *x, float *y, int32_t nthreads) {
    if (!p || m < 0 || (m && (!x || !y))) return SPFQ_EINVAL;
    if (!m) return SPFQ_OK;
    if (p->full && spfq_grouped_fused_ok(p->full, m)) return spfq_matmul_q8(p->full, m, x, y, nthreads);
    int8_t *xq = malloc((size_t)m * p->k);
    float *xs = malloc((size_t)m * 4);
    int rc = (xq && xs) ? spfq_quantize_i8(m, p->k, x, xq, xs) : SPFQ_ENOMEM;
    if (rc == SPFQ_OK) rc = grouped_run(p, m, xq, 1, xs, y, run_i8, nthreads);
    free(xq);
    free(xs);
    return rc;
}
