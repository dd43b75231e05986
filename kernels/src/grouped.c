/* grouped.c — group-wise scales (.spfq format version 3, `compress --group-size G`): one scale
 * (and lam) per (output row, group of G consecutive columns of K), the semantics written in
 * spfq_kernels.h (spfq_grouped_*).
 *
 * The route: at prepare time the weights are cut into one per-row-scale weight set per group
 * (the group's columns re-encoded word-aligned, its scales as the per-row scales, no bias), so a
 * call runs the existing kernels, every ISA's, on each group's columns and adds their float
 * outputs in ascending group order; bias, clamp and activation come after the sum. The codes are
 * never expanded per call; only the group's columns of the activation rows are copied
 * contiguous. The int8 kernels and epilogue of every ISA are bit-identical with the C oracle, so
 * this path is too; the float path runs spfq_matmul_f32_oracle (api.c: the output-lane tables,
 * the oracle's order at any row count). SPARSE weights are cut into PLANES groups (the same
 * values, lam kept).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct spfq_grouped {
    int32_t n, k, group, ngroups;
    spfq_prepared **sub; /* ngroups weight sets of K_g = min(G, K - g G) columns */
    float *bias;         /* (N) or NULL */
    int32_t clamped;
    float clamp_lo, clamp_hi;
    int32_t act;
    float *act_slope;
};

void spfq_grouped_free(spfq_grouped *p) {
    if (!p) return;
    for (int32_t g = 0; p->sub && g < p->ngroups; g++) spfq_free(p->sub[g]);
    free(p->sub);
    free(p->bias);
    free(p->act_slope);
    free(p);
}

/* Group g of the weights (codes c, N rows of K) as its own per-row-scale weight set. */
static int cut_group(const spfq_weights_desc *w, const int8_t *codes, int32_t g, int32_t G, int32_t ng,
                     spfq_prepared **out) {
    const int32_t N = w->n, c0 = g * G, Kg = (w->k - c0) < G ? w->k - c0 : G, W = SPFQ_WORDS(Kg);
    const int L = w->layout == SPFQ_SPARSE ? SPFQ_PLANES : w->layout, bits = L == SPFQ_PLANES ? w->bits : 0;
    uint64_t *sign = L != SPFQ_PLANES ? calloc((size_t)N * W, 8) : NULL;
    uint64_t *mask = L == SPFQ_SIGN_MASK ? calloc((size_t)N * W, 8) : NULL;
    uint64_t *planes = L == SPFQ_PLANES ? calloc((size_t)bits * N * W, 8) : NULL;
    float *scale = malloc((size_t)N * 4), *lam = w->lam ? malloc((size_t)N * 4) : NULL;
    int rc = SPFQ_ENOMEM;
    if ((L == SPFQ_PLANES ? planes != NULL : sign != NULL) && (L != SPFQ_SIGN_MASK || mask) && scale &&
        (!w->lam || lam)) {
        for (int32_t n = 0; n < N; n++) {
            spfq_encode_row(L, bits, codes + (size_t)n * w->k + c0, Kg, W, sign ? sign + (size_t)n * W : NULL,
                   mask ? mask + (size_t)n * W : NULL, planes ? planes + (size_t)n * W : NULL, (size_t)N * W);
            scale[n] = w->scale[(size_t)n * ng + g];
            if (lam) lam[n] = w->lam[(size_t)n * ng + g];
        }
        spfq_weights_desc d = {.layout = L, .n = N, .k = Kg, .bits = L == SPFQ_PLANES ? bits : (L == SPFQ_SIGN ? 1 : 2),
                               .sign = sign, .mask = mask, .planes = planes, .scale = scale, .lam = lam};
        rc = spfq_prepare(&d, out);
    }
    free(sign);
    free(mask);
    free(planes);
    free(scale);
    free(lam);
    return rc;
}

int spfq_grouped_prepare(const spfq_weights_desc *w, int32_t group, spfq_grouped **out) {
    if (!w || !out || group < 1 || w->n <= 0 || w->k <= 0 || !w->scale) return SPFQ_EINVAL;
    *out = NULL;
    const int32_t ng = (int32_t)(((int64_t)w->k + group - 1) / group);
    /* the codes, decoded once through a per-row view of the weights (its scales unused) */
    float *ones = malloc((size_t)w->n * 4);
    if (!ones) return SPFQ_ENOMEM;
    for (int32_t n = 0; n < w->n; n++) ones[n] = 1.0f;
    spfq_weights_desc view = *w;
    view.scale = ones;
    view.lam = NULL;
    view.bias = NULL;
    spfq_prepared *full = NULL;
    int rc = spfq_prepare(&view, &full);
    free(ones);
    if (rc) return rc;
    int8_t *codes = malloc((size_t)w->n * w->k);
    spfq_grouped *p = calloc(1, sizeof *p);
    rc = SPFQ_ENOMEM;
    if (codes && p && (p->sub = calloc((size_t)ng, sizeof *p->sub)) &&
        (!w->bias || (p->bias = malloc((size_t)w->n * 4)))) {
        for (int32_t n = 0; n < w->n; n++) {
            if (w->layout == SPFQ_SIGN || w->layout == SPFQ_SIGN_MASK)
                spfq_sign_row_codes(full, n, codes + (size_t)n * w->k);
            else
                spfq_int_row_codes(full, n, codes + (size_t)n * w->k);
        }
        if (w->bias) memcpy(p->bias, w->bias, (size_t)w->n * 4);
        p->n = w->n, p->k = w->k, p->group = group, p->ngroups = ng;
        rc = SPFQ_OK;
        for (int32_t g = 0; g < ng && rc == SPFQ_OK; g++) rc = cut_group(w, codes, g, group, ng, &p->sub[g]);
    }
    spfq_free(full);
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
    p->clamped = !(lo == -INFINITY && hi == INFINITY);
    p->clamp_lo = lo;
    p->clamp_hi = hi;
    return SPFQ_OK;
}

int spfq_grouped_set_activation(spfq_grouped *p, int32_t kind, const float *slope) {
    return p ? spfq_act_set(&p->act, &p->act_slope, kind, slope, p->n) : SPFQ_EINVAL;
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
    char *cols = malloc((size_t)m * (G < K ? G : K) * size);
    float *t = malloc(MN * sizeof *t);
    int rc = (cols && t) ? SPFQ_OK : SPFQ_ENOMEM;
    for (int32_t g = 0; g < p->ngroups && rc == SPFQ_OK; g++) {
        const int32_t c0 = g * G, Kg = (K - c0) < G ? K - c0 : G;
        for (int32_t r = 0; r < m; r++)
            memcpy(cols + (size_t)r * Kg * size, (const char *)src + ((size_t)r * K + c0) * size, (size_t)Kg * size);
        rc = fn(p->sub[g], m, cols, xscale, g ? t : y, nthreads);
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
    return m ? grouped_run(p, m, xq, 1, xscale, y, run_i8, nthreads) : SPFQ_OK;
}

int spfq_grouped_matmul_q8(const spfq_grouped *p, int32_t m, const float *x, float *y, int32_t nthreads) {
    if (!p || m < 0 || (m && (!x || !y))) return SPFQ_EINVAL;
    if (!m) return SPFQ_OK;
    int8_t *xq = malloc((size_t)m * p->k);
    float *xs = malloc((size_t)m * 4);
    int rc = (xq && xs) ? spfq_quantize_i8(m, p->k, x, xq, xs) : SPFQ_ENOMEM;
    if (rc == SPFQ_OK) rc = grouped_run(p, m, xq, 1, xs, y, run_i8, nthreads);
    free(xq);
    free(xs);
    return rc;
}
