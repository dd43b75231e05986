/* dconv.c — direct convolution of an input with few channels (one group, C <= SPFQ_DC_MAX_C
 * input channels: a network's first conv on an RGB or grey image), weight-only float.
 *
 * Through the im2col GEMM such a layer copies every input pixel KH * KW times into rows of
 * K = C * KH * KW (27 for a 3x3 RGB conv), and quantising those short rows to int8 costs more
 * than their multiply-adds (MobileNetV2's first conv: 0.9 ms against ORT fp32's 0.3 ms). Here
 * the output channels lie in vector lanes (weights unpacked once, tap-major, padded to whole
 * vectors) and each input value of a patch is broadcast: P output pixels x NB vectors of output
 * channels accumulate at once (NB * P <= 8 independent chains).
 *
 * Bit-identical with spfq_matmul_f32's C oracle on the im2col rows (intb.c / binary.c): taps in
 * column order (c, kh, kw) from +0, each adding x * w (a multiply, then an add: no fused
 * multiply-add; this file is ISO C, so no contraction), zero codes skipped; then
 * level * acc + bias (SIGN / SIGN_MASK: w = +-1) or acc + bias (PLANES / SPARSE: w = value(c)).
 * Padding taps read a zero and zero codes use weight 0: a +-0 product leaves a sum that starts at
 * +0 unchanged (a sum of finite terms is never -0), so only an infinite or NaN input on a zero
 * code differs from skipping it; a patch holding a non-finite input is done by the masked path.
 * One micro-kernel source for every ISA (GCC vector extensions, instantiated per target:
 * AVX-512 16 lanes, AVX2 8, the baseline 4 (NEON on aarch64, SSE2 on x86-64)).
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct spfq_dc {
    spfq_conv_geom g;
    int32_t n, k, np, one_level; /* np: n rounded up to 16 lanes */
    float *w;                     /* (k, np) weights, 0 for zero codes and padding lanes */
    float *live;                  /* (k, np) 1 where the code is nonzero */
    float *scale, *bias;          /* (np): level (one-level layouts) and bias, 0 past n */
    float lo, hi;
    int32_t act;                  /* spfq_dc_set_activation (spfq_dconv only; api.c applies its own */
    float *act_slope;             /* after spfq_dc_gemm_rows) */
};

void spfq_dc_free(spfq_dc *p) {
    if (!p) return;
    free(p->w);
    free(p->live);
    free(p->scale);
    free(p->bias);
    free(p->act_slope);
    free(p);
}

int spfq_dc_set_clamp(spfq_dc *p, float lo, float hi) {
    if (!p || lo != lo || hi != hi || lo > hi) return SPFQ_EINVAL;
    p->lo = lo;
    p->hi = hi;
    return SPFQ_OK;
}

int spfq_dc_set_activation(spfq_dc *p, int32_t kind, const float *slope) {
    return p ? spfq_act_set(&p->act, &p->act_slope, kind, slope, p->n) : SPFQ_EINVAL;
}

/* The lane-order tables of prepared weights (any K; the geometry is the caller's). */
static spfq_dc *dc_from(const spfq_prepared *pw, const spfq_conv_geom *g) {
    spfq_dc *p = calloc(1, sizeof *p);
    int8_t *codes = malloc((size_t)pw->d.k);
    if (!p || !codes) {
        free(p);
        free(codes);
        return NULL;
    }
    p->g = *g;
    p->n = pw->d.n;
    p->k = pw->d.k;
    p->np = (p->n + 15) / 16 * 16;
    p->lo = pw->clamped ? pw->clamp_lo : -INFINITY;
    p->hi = pw->clamped ? pw->clamp_hi : INFINITY;
    p->one_level = pw->d.layout == SPFQ_SIGN || pw->d.layout == SPFQ_SIGN_MASK;
    const size_t cells = (size_t)p->k * (size_t)p->np;
    p->w = aligned_alloc(64, cells * sizeof(float));
    p->live = aligned_alloc(64, cells * sizeof(float));
    p->scale = aligned_alloc(64, (size_t)p->np * sizeof(float));
    p->bias = aligned_alloc(64, (size_t)p->np * sizeof(float));
    if (!p->w || !p->live || !p->scale || !p->bias) {
        free(codes);
        spfq_dc_free(p);
        return NULL;
    }
    memset(p->w, 0, cells * sizeof(float));
    memset(p->live, 0, cells * sizeof(float));
    memset(p->scale, 0, (size_t)p->np * sizeof(float));
    memset(p->bias, 0, (size_t)p->np * sizeof(float));
    const spfq_weights_desc *d = &pw->d;
    for (int32_t o = 0; o < p->n; o++) {
        spfq_row_codes(pw, o, codes);
        for (int32_t t = 0; t < p->k; t++) {
            const size_t i = (size_t)t * p->np + o;
            p->w[i] = codes[t] == 0 ? 0.0f : p->one_level ? (float)codes[t] : spfq_int_value(codes[t], d->scale[o], d->lam, o);
            p->live[i] = codes[t] != 0 ? 1.0f : 0.0f;
        }
        p->scale[o] = p->one_level ? d->scale[o] : 1.0f;
        p->bias[o] = d->bias ? d->bias[o] : 0.0f;
    }
    free(codes);
    return p;
}

int spfq_dc_prepare(const spfq_weights_desc *w, const spfq_conv_geom *g, spfq_dc **out) {
    if (!w || !g || !out) return SPFQ_EINVAL;
    *out = NULL;
    if (g->channels < 1 || g->channels > SPFQ_DC_MAX_C || g->kh < 1 || g->kw < 1 || g->sh < 1 || g->sw < 1 ||
        g->dh < 1 || g->dw < 1 || g->pt < 0 || g->pl < 0 || g->pb < 0 || g->pr < 0)
        return SPFQ_EINVAL;
    if ((int64_t)g->channels * g->kh * g->kw != w->k || g->outputs != w->n) return SPFQ_EINVAL;
    spfq_prepared *pw = NULL;
    int rc = spfq_prepare(w, &pw);
    if (rc) return rc;
    spfq_dc *p = dc_from(pw, g);
    spfq_free(pw);
    if (!p) return SPFQ_ENOMEM;
    *out = p;
    return SPFQ_OK;
}

/* ------------------------------------------------------------------ micro-kernels */

/* The inputs of a call's P output pixels: tap t of pixel i reads base[i][tofs[t]] (the image
 * for a patch inside it; a gathered patch with zeros in the padding, tofs the identity, for a
 * border pixel). finite: every value is finite. */
typedef struct {
    const float *base[4];
    const int64_t *tofs;
    int finite;
} dc_in;

/* The masked path (any ISA, scalar): one pixel, taps in column order, zero codes skipped (a
 * padding tap adds 0 * w = +-0, which changes nothing), exactly as the oracle. */
static void pixel_exact(const spfq_dc *p, const float *base, const int64_t *tofs, float *y) {
    for (int32_t o = 0; o < p->n; o++) {
        float acc = 0.0f;
        for (int32_t t = 0; t < p->k; t++) {
            const size_t wi = (size_t)t * p->np + o;
            if (p->live[wi] != 0.0f) acc += base[tofs[t]] * p->w[wi];
        }
        const float v = p->one_level ? p->scale[o] * acc + p->bias[o] : acc + p->bias[o];
        y[o] = spfq_clamp(v, p->lo, p->hi);
    }
}

/* NB vectors of V lanes of output channels from vector j0, P pixels; y[i] + lane, stride 1. */
#define DC_KERNEL(NAME, TGT, V)                                                                              \
    typedef float NAME##_v __attribute__((vector_size(4 * (V)), aligned(4), may_alias));                      \
    typedef int32_t NAME##_m __attribute__((vector_size(4 * (V)), aligned(4)));                               \
    /* m ? a : b lane by lane (m from a comparison: all ones or zero) */                                     \
    TGT static inline NAME##_v NAME##_sel(NAME##_m m, NAME##_v a, NAME##_v b) {                                \
        return (NAME##_v)((m & (NAME##_m)a) | (~m & (NAME##_m)b));                                           \
    }                                                                                                        \
    __attribute__((always_inline)) TGT static inline void NAME##_one(const spfq_dc *p, const dc_in *in,        \
                                                                    const int P, const int NB, int32_t j0,   \
                                                                    float *const *y) {                       \
        NAME##_v acc[4][4];                                                                                  \
        for (int i = 0; i < P; i++)                                                                          \
            for (int j = 0; j < NB; j++) acc[i][j] = (NAME##_v){0};                                          \
        const int32_t k = p->k, np = p->np;                                                                  \
        const float *w = p->w + (size_t)j0 * (V);                                                            \
        for (int32_t t = 0; t < k; t++, w += np) {                                                           \
            NAME##_v wv[4];                                                                                  \
            for (int j = 0; j < NB; j++) wv[j] = *(const NAME##_v *)(w + (size_t)j * (V));                   \
            for (int i = 0; i < P; i++) {                                                                    \
                const float xv = in->base[i][in->tofs[t]];                                                  \
                for (int j = 0; j < NB; j++) acc[i][j] = acc[i][j] + xv * wv[j];                             \
            }                                                                                                \
        }                                                                                                    \
        for (int j = 0; j < NB; j++) {                                                                       \
            NAME##_v sc, bi, lo = (NAME##_v){0} + p->lo, hi = (NAME##_v){0} + p->hi;                         \
            sc = *(const NAME##_v *)(p->scale + (size_t)(j0 + j) * (V));                                      \
            bi = *(const NAME##_v *)(p->bias + (size_t)(j0 + j) * (V));                                       \
            const int32_t c0 = (j0 + j) * (V), live = p->n - c0 < (V) ? p->n - c0 : (V);                      \
            for (int i = 0; i < P; i++) {                                                                    \
                NAME##_v v = p->one_level ? sc * acc[i][j] + bi : acc[i][j] + bi;                            \
                v = NAME##_sel(v < lo, lo, v); /* spfq_clamp, lane by lane (NaN stays) */                    \
                v = NAME##_sel(v > hi, hi, v);                                                               \
                if (live == (V))                                                                             \
                    *(NAME##_v *)(y[i] + c0) = v;                                                            \
                else                                                                                         \
                    memcpy(y[i] + c0, &v, (size_t)live * sizeof(float));                                     \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    /* every output channel of P pixels (a non-finite input: the exact path) */                              \
    __attribute__((noinline)) TGT static void NAME(const spfq_dc *p, const dc_in *in, int P, float *const *y,      \
                                                  int32_t c0, int32_t c1) {                                    \
        if (!in->finite) {                                                                                   \
            for (int i = 0; i < P; i++) pixel_exact(p, in->base[i], in->tofs, y[i]);                        \
            return;                                                                                          \
        }                                                                                                    \
        const int32_t nv = ((c1 < p->n ? c1 : p->n) + (V) - 1) / (V); /* output channels [c0, c1) */          \
        const int most = P == 4 ? 2 : 4;                                                                     \
        const dc_in *x = in;                                                                                 \
        for (int32_t j0 = c0 / (V); j0 < nv;) {                                                              \
            const int nb = nv - j0 < most ? (int)(nv - j0) : most;                                           \
            if (P == 4) {                                                                                    \
                if (nb == 2) NAME##_one(p, x, 4, 2, j0, y);                                                  \
                else NAME##_one(p, x, 4, 1, j0, y);                                                          \
            } else if (P == 2) {                                                                             \
                if (nb == 4) NAME##_one(p, x, 2, 4, j0, y);                                                  \
                else if (nb == 3) NAME##_one(p, x, 2, 3, j0, y);                                             \
                else if (nb == 2) NAME##_one(p, x, 2, 2, j0, y);                                             \
                else NAME##_one(p, x, 2, 1, j0, y);                                                          \
            } else {                                                                                         \
                if (nb == 4) NAME##_one(p, x, 1, 4, j0, y);                                                  \
                else if (nb == 3) NAME##_one(p, x, 1, 3, j0, y);                                             \
                else if (nb == 2) NAME##_one(p, x, 1, 2, j0, y);                                             \
                else NAME##_one(p, x, 1, 1, j0, y);                                                          \
            }                                                                                                \
            j0 += nb;                                                                                        \
        }                                                                                                    \
    }

typedef void (*dc_fn)(const spfq_dc *, const dc_in *, int, float *const *, int32_t, int32_t);

DC_KERNEL(dc_base, , 4)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
DC_KERNEL(dc_avx2, __attribute__((target("avx2"))), 8)
DC_KERNEL(dc_avx512, __attribute__((target("avx512f"))), 16)
#endif

/* The micro-kernel of the active ISA ("c": the baseline one, same results). */
static dc_fn dc_kernel(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    const char *isa = spfq_isa();
    if (spfq_isa_avx512()) return dc_avx512;
    if (!strcmp(isa, "avx2")) return dc_avx2;
#endif
    return dc_base;
}

/* ------------------------------------------------------------------ driver */

typedef struct {
    const spfq_dc *p;
    int32_t nhwc, B, H, W, OH, OW, bands;
    const float *x;
    float *y;
    dc_fn fn;
    int failed;
} dc_task;

/* Pixels per call: 4 when the outputs fill at most 2 vectors of the widest ISA, else 2. */
static int dc_pixels(const spfq_dc *p) { return p->np <= 32 ? 4 : 2; }

/* No inf or NaN among x[0..n) (an integer test of the exponent bits: it vectorises). */
static int all_finite(const float *x, size_t n) {
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, 4);
        bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
    }
    return !bad;
}

/* Output rows of band `band` of image bi: P pixels at a time; a pixel whose patch lies inside
 * the image reads it there, a border pixel from a gathered patch (tap order (c, kh, kw), zeros in
 * the padding). NCHW output goes through a row of NHWC values. */
static void dc_unit(dc_task *t, int64_t bi, int32_t band, float *row) {
    const spfq_dc *p = t->p;
    const spfq_conv_geom *g = &p->g;
    const int32_t C = g->channels, k = p->k, taps = g->kh * g->kw;
    const int32_t oh0 = (int32_t)((int64_t)t->OH * band / t->bands), oh1 = (int32_t)((int64_t)t->OH * (band + 1) / t->bands);
    const size_t HW = (size_t)t->H * t->W, OHW = (size_t)t->OH * t->OW;
    const int64_t cs = t->nhwc ? 1 : (int64_t)HW, ps = t->nhwc ? C : 1; /* channel, pixel strides */
    const float *xb = t->x + (size_t)bi * HW * C;
    float patch[4][SPFQ_DC_MAX_C * 64];
    int64_t tofs[SPFQ_DC_MAX_C * 64], ident[SPFQ_DC_MAX_C * 64];
    for (int32_t c = 0; c < C; c++)
        for (int32_t kh = 0; kh < g->kh; kh++)
            for (int32_t kw = 0; kw < g->kw; kw++) {
                const int32_t tt = c * taps + kh * g->kw + kw;
                tofs[tt] = c * cs + ((int64_t)kh * g->dh * t->W + (int64_t)kw * g->dw) * ps;
                ident[tt] = tt;
            }
    const int P = dc_pixels(p);
    for (int32_t oh = oh0; oh < oh1; oh++) {
        const int32_t ih0 = oh * g->sh - g->pt, ihl = ih0 + (g->kh - 1) * g->dh;
        float *yrow = t->nhwc ? t->y + ((size_t)bi * OHW + (size_t)oh * t->OW) * p->n : row;
        /* the input rows this output row reads: all finite? (else every patch is checked) */
        int rows_finite = 1;
        for (int32_t kh = 0; kh < g->kh && rows_finite; kh++) {
            const int32_t ih = ih0 + kh * g->dh;
            if (ih < 0 || ih >= t->H) continue;
            for (int32_t c = 0; c < (t->nhwc ? 1 : C) && rows_finite; c++)
                rows_finite = all_finite(xb + (size_t)c * (size_t)cs * (t->nhwc ? 0 : 1) + (size_t)ih * t->W * ps,
                                         (size_t)t->W * (size_t)ps);
        }
        for (int32_t ow = 0; ow < t->OW;) {
            const int q = t->OW - ow >= P ? P : t->OW - ow >= 2 ? 2 : 1;
            float *y[4];
            dc_in in = {{NULL, NULL, NULL, NULL}, tofs, 1};
            int gathered = 0;
            for (int i = 0; i < q; i++) {
                const int32_t iw0 = (ow + i) * g->sw - g->pl;
                y[i] = yrow + (size_t)(ow + i) * p->n;
                if (ih0 >= 0 && ihl < t->H && iw0 >= 0 && iw0 + (g->kw - 1) * g->dw < t->W) {
                    in.base[i] = xb + ((int64_t)ih0 * t->W + iw0) * ps;
                    continue;
                }
                gathered = 1;
                float *pt = patch[i];
                for (int32_t kh = 0; kh < g->kh; kh++) {
                    const int32_t ih = ih0 + kh * g->dh;
                    for (int32_t kw = 0; kw < g->kw; kw++) {
                        const int32_t iw = iw0 + kw * g->dw, tt = kh * g->kw + kw;
                        const int in_img = ih >= 0 && ih < t->H && iw >= 0 && iw < t->W;
                        const float *px = xb + ((int64_t)ih * t->W + iw) * ps;
                        for (int32_t c = 0; c < C; c++) pt[c * taps + tt] = in_img ? px[c * cs] : 0.0f;
                    }
                }
                in.base[i] = pt;
            }
            if (gathered) { /* one offset table for all: copy the inside patches too */
                for (int i = 0; i < q; i++)
                    if (in.base[i] != patch[i]) {
                        for (int32_t tt = 0; tt < k; tt++) patch[i][tt] = in.base[i][tofs[tt]];
                        in.base[i] = patch[i];
                    }
                in.tofs = ident;
            }
            if (!rows_finite)
                for (int i = 0; i < q; i++)
                    for (int32_t tt = 0; tt < k; tt++)
                        if (!isfinite(in.base[i][in.tofs[tt]])) in.finite = 0;
            t->fn(p, &in, q, y, 0, p->n);
            ow += q;
        }
        if (!t->nhwc) /* (ow, n) -> (n, ow) */
            for (int32_t o = 0; o < p->n; o++) {
                float *dst = t->y + ((size_t)bi * p->n + o) * OHW + (size_t)oh * t->OW;
                for (int32_t ow = 0; ow < t->OW; ow++) dst[ow] = row[(size_t)ow * p->n + o];
            }
    }
}

static void dc_chunk(void *ctx, int32_t chunk, int32_t nchunks) {
    dc_task *t = ctx;
    const int64_t units = (int64_t)t->B * t->bands, a = units * chunk / nchunks, b = units * (chunk + 1) / nchunks;
    float *row = t->nhwc ? NULL : malloc((size_t)t->OW * (size_t)t->p->n * sizeof(float));
    if (!t->nhwc && !row) {
        __atomic_store_n(&t->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t i = a; i < b; i++) dc_unit(t, i / t->bands, (int32_t)(i % t->bands), row);
    free(row);
}

int spfq_dconv(const spfq_dc *p, int32_t nhwc, int32_t b, int32_t h, int32_t w, const float *x, float *y,
               int32_t nthreads) {
    if (!p || b < 0 || h < 1 || w < 1 || !x || !y) return SPFQ_EINVAL;
    const spfq_conv_geom *g = &p->g;
    if ((int64_t)g->kh * g->kw > 64) return SPFQ_EUNSUPPORTED;
    const int64_t OH = ((int64_t)h + g->pt + g->pb - (int64_t)g->dh * (g->kh - 1) - 1) / g->sh + 1;
    const int64_t OW = ((int64_t)w + g->pl + g->pr - (int64_t)g->dw * (g->kw - 1) - 1) / g->sw + 1;
    if (OH < 1 || OW < 1 || OH > INT32_MAX || OW > INT32_MAX) return SPFQ_EINVAL;
    if (!b) return SPFQ_OK;
    dc_task t = {p, nhwc != 0, b, h, w, (int32_t)OH, (int32_t)OW, 1, x, y, dc_kernel(), 0};
    nthreads = spfq_threads_for((int64_t)b * OH * OW * p->n * p->k, nthreads);
    int64_t chunks = nthreads <= 1 ? 1 : 4 * (int64_t)nthreads;
    if (chunks > b) { /* bands of rows so that every thread has work */
        const int64_t bands = (chunks + b - 1) / b;
        t.bands = (int32_t)(bands < OH ? bands : OH);
    }
    const int64_t units = (int64_t)b * t.bands;
    if (chunks > units) chunks = units;
    spfq_pool_run(nthreads, (int32_t)chunks, dc_chunk, &t);
    if (t.failed) return SPFQ_ENOMEM;
    if (p->act) spfq_act_output(p->act, p->act_slope, nhwc, b, p->n, (size_t)OH * (size_t)OW, y);
    return SPFQ_OK;
}

/* ------------------------------------------------------------------ weight-only GEMM rows */

/* api.c's tall weight-only calls: the same micro-kernel with a row of x as the patch (its K
 * values in column order, the oracle's order; zero codes weight 0 as above, a row holding a
 * non-finite value by the exact path). Built once per weights (spfq_prepared.f32_lanes). */
spfq_dc *spfq_dc_gemm(const spfq_prepared *w) {
    const spfq_conv_geom g = {w->d.k, w->d.n, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0};
    return dc_from(w, &g);
}

/* y (m, n) = rows x (m, k) through p, P rows per micro-kernel call; SPFQ_ENOMEM without the
 * per-thread offset table. */
int spfq_dc_gemm_rows(const spfq_dc *p, int32_t m, const float *x, float *y) {
    const dc_fn fn = dc_kernel();
    const int P = dc_pixels(p);
    int64_t *ident = spfq_scratch(SPFQ_SCR_DC_TOFS, (size_t)p->k * sizeof(int64_t), 0);
    if (!ident) return SPFQ_ENOMEM;
    for (int32_t t = 0; t < p->k; t++) ident[t] = t;
    /* outputs in chunks whose weight table (K x chunk floats) stays in L2 while every row runs */
    int32_t chunk = (int32_t)((256 * 1024) / ((size_t)p->k * sizeof(float))) / 64 * 64;
    chunk = chunk < 64 ? 64 : chunk;
    for (int32_t c0 = 0; c0 < p->n; c0 += chunk)
        for (int32_t r = 0; r < m;) {
            const int q = m - r >= P ? P : m - r >= 2 ? 2 : 1;
            dc_in in = {{NULL, NULL, NULL, NULL}, ident, all_finite(x + (size_t)r * p->k, (size_t)q * p->k)};
            float *yy[4];
            for (int i = 0; i < q; i++) {
                in.base[i] = x + (size_t)(r + i) * p->k;
                yy[i] = y + (size_t)(r + i) * p->n;
            }
            fn(p, &in, q, yy, c0, c0 + chunk);
            r += q;
        }
    return SPFQ_OK;
}
