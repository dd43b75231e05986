/* dwconv.c — depthwise convolution (one input channel per group) straight from NCHW planes.
 *
 * The im2col path (spfq_layer.hpp conv) runs a depthwise layer as one GEMM call per channel
 * with N = 1, K = 9: the patch copy, the per-row quantiser and the call overhead dwarf the 9
 * multiply-adds per output. Here the weights (a few taps per channel) are unpacked once at
 * prepare time and every output row of a plane is computed tap by tap, vectorised along the
 * output width: for each tap, one pass y[ow] += x[ih, ow * sw + off] * w over the columns
 * whose input is inside the image (zero padding is never read).
 *
 * Results are bit-identical with the im2col path through the C oracle (spfq_kernels.h):
 *   f32: taps added in column order (kh, kw) from 0.0f, zero codes skipped, then
 *        level * acc + bias (SIGN / SIGN_MASK: weight +-1) or acc + bias (PLANES / SPARSE:
 *        weight value(c) as intb.c computes it). ISO C build: no fused multiply-add.
 *   i8:  per output pixel (= im2col row) amax = max |x| over the patch (padding adds 0),
 *        xs = amax / 127, q = x * (127 / amax) rounded to nearest even, clamped to +-127 (0 for
 *        NaN; xs = q = 0 below amax 2^-100), exactly as quant.c; acc_c = sum q c, acc_s = sum q sign(c) are integers below 2^24
 *        (k * 127 * 127, k <= 1040: checked), so float lanes hold them exactly; then the
 *        epilogue of api.c's i8_finish, the same float expression.
 * The row functions are built for AVX-512, AVX2 and the baseline (target_clones on x86-64
 * GCC); on aarch64 the baseline is NEON, which GCC's vectoriser uses at -O3.
 */
#define _GNU_SOURCE
/* Values are unchanged (this is not fast-math); GCC may then evaluate the comparisons of the
 * int8 quantiser unconditionally, which it must to vectorise them. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dwconv.h"
#include "internal.h"

#define DW_MAX_TAPS 1040 /* k * 127 * 127 < 2^24: exact integer sums in float */
void spfq_dw_free(spfq_dw *p) {
    if (!p) return;
    free(p->code);
    free(p->wf);
    free(p->c);
    free(p->s);
    free(p->scale);
    free(p->lamx);
    free(p->bias);
    free(p->lane);
    free(p->lane16);
    free(p->dense16);
    free(p->act_slope);
    free(p);
}

/* The weights of each block of DW_LANES output channels in lane order (lanes past n repeat
 * the block's first channel; their outputs are never stored). */
static int lane_order(spfq_dw *p) {
    enum { L = DW_LANES };
    const int32_t k = p->k;
    p->nblk = (p->n + L - 1) / L;
    const size_t per = (4 * (size_t)k + 3) * L;
    p->lane = malloc((size_t)p->nblk * per * sizeof(float));
    if (!p->lane) return 1;
    for (int32_t b = 0; b < p->nblk; b++) {
        float *w = p->lane + (size_t)b * per, *cw = w + (size_t)k * L, *sw = cw + (size_t)k * L;
        float *live = sw + (size_t)k * L, *e = live + (size_t)k * L;
        for (int32_t l = 0; l < L; l++) {
            const int32_t o = b * L + l < p->n ? b * L + l : b * L;
            for (int32_t t = 0; t < k; t++) {
                const size_t i = (size_t)o * k + t;
                w[t * L + l] = p->wf[i];
                cw[t * L + l] = p->c[i];
                sw[t * L + l] = p->s[i];
                live[t * L + l] = p->code[i] != 0 ? 1.0f : 0.0f;
            }
            e[l] = p->scale[o];
            e[L + l] = p->lamx[o];
            e[2 * L + l] = p->bias[o];
        }
    }
    return 0;
}

/* The f32 weights of each full block of 16 output channels in lane order (AVX-512, NHWC). */
static int lane_order16(spfq_dw *p) {
    if (p->n % 16) return 0;
    const int32_t k = p->k, nb = p->n / 16;
    const size_t per = (2 * (size_t)k + 2) * 16;
    p->lane16 = aligned_alloc(64, (size_t)nb * per * sizeof(float)); /* per is a multiple of 16 floats */
    p->dense16 = malloc((size_t)nb);
    if (!p->lane16 || !p->dense16) return 1;
    for (int32_t b = 0; b < nb; b++) {
        float *w = p->lane16 + (size_t)b * per, *live = w + (size_t)k * 16, *e = live + (size_t)k * 16;
        p->dense16[b] = 1;
        for (int32_t l = 0; l < 16; l++) {
            const int32_t o = b * 16 + l;
            for (int32_t t = 0; t < k; t++) {
                const size_t i = (size_t)o * k + t;
                w[t * 16 + l] = p->wf[i];
                live[t * 16 + l] = p->code[i] != 0 ? 1.0f : 0.0f;
                if (!p->code[i]) p->dense16[b] = 0;
            }
            e[l] = p->scale[o];
            e[16 + l] = p->bias[o];
        }
    }
    return 0;
}

int spfq_dw_set_clamp(spfq_dw *p, float lo, float hi) {
    if (!p || lo != lo || hi != hi || lo > hi) return SPFQ_EINVAL;
    p->lo = lo;
    p->hi = hi;
    return SPFQ_OK;
}

int spfq_dw_set_activation(spfq_dw *p, int32_t kind, const float *slope) {
    return p ? spfq_act_set(&p->act, &p->act_slope, kind, slope, p->n) : SPFQ_EINVAL;
}

int spfq_dw_prepare(const spfq_weights_desc *w, const spfq_dw_geom *g, spfq_dw **out) {
    if (!w || !g || !out) return SPFQ_EINVAL;
    *out = NULL;
    if (g->channels < 1 || g->mult < 1 || g->kh < 1 || g->kw < 1 || g->sh < 1 || g->sw < 1 || g->dh < 1 ||
        g->dw < 1 || g->pt < 0 || g->pl < 0 || g->pb < 0 || g->pr < 0)
        return SPFQ_EINVAL;
    if ((int64_t)g->channels * g->mult != w->n || (int64_t)g->kh * g->kw != w->k) return SPFQ_EINVAL;
    if (w->k > DW_MAX_TAPS) return SPFQ_EUNSUPPORTED;
    spfq_prepared *pw = NULL;
    int rc = spfq_prepare(w, &pw);
    if (rc) return rc;
    const int32_t n = w->n, k = w->k;
    spfq_dw *p = calloc(1, sizeof *p);
    if (!p) {
        spfq_free(pw);
        return SPFQ_ENOMEM;
    }
    p->g = *g;
    p->lo = -INFINITY;
    p->hi = INFINITY;
    p->n = n;
    p->k = k;
    p->one_level = w->layout == SPFQ_SIGN || w->layout == SPFQ_SIGN_MASK;
    p->two = !p->one_level;
    const size_t cells = (size_t)n * (size_t)k;
    p->code = malloc(cells);
    p->wf = malloc(cells * sizeof(float));
    p->c = malloc(cells * sizeof(float));
    p->s = malloc(cells * sizeof(float));
    p->scale = malloc((size_t)n * sizeof(float));
    p->lamx = malloc((size_t)n * sizeof(float));
    p->bias = malloc((size_t)n * sizeof(float));
    if (!p->code || !p->wf || !p->c || !p->s || !p->scale || !p->lamx || !p->bias) {
        spfq_free(pw);
        spfq_dw_free(p);
        return SPFQ_ENOMEM;
    }
    const spfq_weights_desc *d = &pw->d;
    for (int32_t o = 0; o < n; o++) {
        int8_t *c = p->code + (size_t)o * k;
        spfq_row_codes(pw, o, c);
        for (int32_t t = 0; t < k; t++) {
            const int v = c[t];
            const size_t i = (size_t)o * k + t;
            p->wf[i] = p->one_level ? (float)v : spfq_int_value(v, d->scale[o], d->lam, o);
            p->c[i] = (float)v;
            p->s[i] = (float)(v > 0) - (float)(v < 0);
        }
        p->scale[o] = d->scale[o];
        p->lamx[o] = (p->two && d->lam) ? d->lam[o] - d->scale[o] : 0.0f;
        p->bias[o] = d->bias ? d->bias[o] : 0.0f;
    }
    /* i8 epilogue form (api.c i8_finish): one level -> scale * acc_s; PLANES / SPARSE with lam
     * -> scale * acc_c + (lam - scale) * acc_s; without lam -> scale * acc_c */
    if (p->two && !d->lam) p->two = 2;
    spfq_free(pw);
    if (lane_order(p) || lane_order16(p)) {
        spfq_dw_free(p);
        return SPFQ_ENOMEM;
    }
    *out = p;
    return SPFQ_OK;
}

/* The output columns [lo, hi) whose input column ow * sw + off lies in [0, W). */
typedef struct { int32_t lo, hi; } cols;
static inline cols col_range(int32_t off, int32_t sw, int32_t W, int32_t OW) {
    int32_t a = off >= 0 ? 0 : (-off + sw - 1) / sw;
    int32_t b = W - 1 - off < 0 ? 0 : (W - 1 - off) / sw + 1;
    cols r = {a < OW ? a : OW, b < OW ? b : OW};
    if (r.hi < r.lo) r.hi = r.lo;
    return r;
}

/* quant.c's rule 2 for one patch: xscale = amax / 127 and r = 127 / amax (0 and 0 below
 * 2^-100), written so that it vectorises */
static inline float patch_xs(float amax) { return amax >= 0x1p-100f ? amax / 127.0f : 0.0f; }
static inline float patch_r(float amax) { return amax >= 0x1p-100f ? 127.0f / amax : 0.0f; }

/* quant.c's rounding of one product t = x * r: to nearest, ties to even (the 2^23 trick: exact
 * for |t| < 2^22; an int conversion would not vectorise under GCC's trapping-math rules),
 * clamped to +-127, 0 for NaN (an infinite x in an infinite patch: r = 0). */
static inline float quant_q(float t) {
    const float n = (t + 12582912.0f) - 12582912.0f; /* 0x1.8p23 */
    const float q = n < 127.0f ? (n > -127.0f ? n : -127.0f) : 127.0f;
    return t == t ? q : 0.0f;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DW_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DW_CLONES
#endif

/* One output row, weight-only float. */
DW_CLONES static void row_f32(const spfq_dw *p, int32_t o, const float *plane, int32_t H, int32_t W, int32_t oh,
                              int32_t OW, float *restrict y) {
    const spfq_dw_geom *g = &p->g;
    const int8_t *code = p->code + (size_t)o * p->k;
    const float *wf = p->wf + (size_t)o * p->k;
    for (int32_t ow = 0; ow < OW; ow++) y[ow] = 0.0f;
    for (int32_t kh = 0; kh < g->kh; kh++) {
        const int32_t ih = oh * g->sh - g->pt + kh * g->dh;
        if (ih < 0 || ih >= H) continue;
        const float *xr = plane + (size_t)ih * W;
        for (int32_t kw = 0; kw < g->kw; kw++) {
            const int32_t t = kh * g->kw + kw;
            if (!code[t]) continue;
            const int32_t off = kw * g->dw - g->pl, sw = g->sw;
            const cols r = col_range(off, sw, W, OW);
            const float wv = wf[t], *xp = xr + off;
            if (sw == 1)
                for (int32_t ow = r.lo; ow < r.hi; ow++) y[ow] += xp[ow] * wv;
            else
                for (int32_t ow = r.lo; ow < r.hi; ow++) y[ow] += xp[ow * sw] * wv;
        }
    }
    const float level = p->one_level ? p->scale[o] : 1.0f, bias = p->bias[o];
    const float lo = p->lo, hi = p->hi;
    if (p->one_level)
        for (int32_t ow = 0; ow < OW; ow++) y[ow] = spfq_clamp(level * y[ow] + bias, lo, hi);
    else
        for (int32_t ow = 0; ow < OW; ow++) y[ow] = spfq_clamp(y[ow] + bias, lo, hi);
}

/* One output row, int8 activations quantised per patch; tmp holds 4 * OW floats. */
DW_CLONES static void row_i8(const spfq_dw *p, int32_t o, const float *plane, int32_t H, int32_t W, int32_t oh,
                             int32_t OW, float *restrict y, float *restrict tmp) {
    const spfq_dw_geom *g = &p->g;
    const int32_t k = p->k, sw = g->sw;
    const int8_t *code = p->code + (size_t)o * k;
    const float *cf = p->c + (size_t)o * k, *sf = p->s + (size_t)o * k;
    float *restrict xs = tmp, *restrict ac = tmp + OW, *restrict as = tmp + 2 * (size_t)OW;
    float *restrict rc = tmp + 3 * (size_t)OW;
    for (int32_t ow = 0; ow < OW; ow++) {
        xs[ow] = 0.0f;
        ac[ow] = 0.0f;
        as[ow] = 0.0f;
    }
    for (int32_t kh = 0; kh < g->kh; kh++) { /* amax over the whole patch (every tap) */
        const int32_t ih = oh * g->sh - g->pt + kh * g->dh;
        if (ih < 0 || ih >= H) continue;
        const float *xr = plane + (size_t)ih * W;
        for (int32_t kw = 0; kw < g->kw; kw++) {
            const int32_t off = kw * g->dw - g->pl;
            const cols r = col_range(off, sw, W, OW);
            const float *xp = xr + off;
            for (int32_t ow = r.lo; ow < r.hi; ow++) {
                const float a = fabsf(xp[ow * sw]), m = xs[ow];
                xs[ow] = a > m ? a : m; /* a NaN is ignored, as by fmaxf */
            }
        }
    }
    for (int32_t ow = 0; ow < OW; ow++) {
        rc[ow] = patch_r(xs[ow]);
        xs[ow] = patch_xs(xs[ow]);
    }
    for (int32_t kh = 0; kh < g->kh; kh++) {
        const int32_t ih = oh * g->sh - g->pt + kh * g->dh;
        if (ih < 0 || ih >= H) continue;
        const float *xr = plane + (size_t)ih * W;
        for (int32_t kw = 0; kw < g->kw; kw++) {
            const int32_t t = kh * g->kw + kw;
            if (!code[t]) continue;
            const int32_t off = kw * g->dw - g->pl;
            const cols r = col_range(off, sw, W, OW);
            const float c = cf[t], s = sf[t], *xp = xr + off;
            if (sw == 1)
                for (int32_t ow = r.lo; ow < r.hi; ow++) {
                    const float q = quant_q(xp[ow] * rc[ow]);
                    ac[ow] += q * c;
                    as[ow] += q * s;
                }
            else
                for (int32_t ow = r.lo; ow < r.hi; ow++) {
                    const float q = quant_q(xp[ow * sw] * rc[ow]);
                    ac[ow] += q * c;
                    as[ow] += q * s;
                }
        }
    }
    const float scale = p->scale[o], lamx = p->lamx[o], bias = p->bias[o], lo = p->lo, hi = p->hi;
    if (p->one_level)
        for (int32_t ow = 0; ow < OW; ow++) y[ow] = spfq_clamp(xs[ow] * (scale * as[ow]) + bias, lo, hi);
    else if (p->two == 1)
        for (int32_t ow = 0; ow < OW; ow++) y[ow] = spfq_clamp(xs[ow] * (scale * ac[ow] + lamx * as[ow]) + bias, lo, hi);
    else
        for (int32_t ow = 0; ow < OW; ow++) y[ow] = spfq_clamp(xs[ow] * (scale * ac[ow]) + bias, lo, hi);
}

/* Channels in the lanes: DW_LANES outputs of one block per vector, weights from the block's
 * lane-order copy (lane_order). Used for NHWC input (read in place: pixel stride C) and for
 * narrow NCHW planes (OW < DW_LANES_BELOW: the 28x28 .. 7x7 layers of a MobileNet leave the row
 * loops mostly in their scalar tails), whose planes are first interleaved into
 * xin[(ih * W + iw) * 8 + l]. Same operations per lane as the row functions (f32: zero codes
 * add nothing, selected away; i8: their q * 0 is an exact 0).
 * Output rows [oh0, oh1) of block blk; input pixel (ih, iw) of lane l at
 * xin[((ih - ih_lo) * W + iw) * ps + l]; output (oh, ow) of lane l < nb at
 * y[(oh * OW + ow) * ys + l * yl]. */
DW_CLONES static void lanes_rows_c(const spfq_dw *p, int32_t int8, int32_t blk, int32_t nb, lanes_io io, int32_t H,
                                 int32_t W, int32_t oh0, int32_t oh1, int32_t OW) {
    enum { L = DW_LANES };
    const spfq_dw_geom *g = &p->g;
    const int32_t k = p->k;
    const float *w = p->lane + (size_t)blk * (4 * (size_t)k + 3) * L, *cw = w + (size_t)k * L;
    const float *sw8 = cw + (size_t)k * L, *live = sw8 + (size_t)k * L, *e = live + (size_t)k * L;
    const float *scale = e, *lamx = e + L, *bias = e + 2 * L;
    for (int32_t oh = oh0; oh < oh1; oh++)
        for (int32_t ow = 0; ow < OW; ow++) {
            float a0[L], a1[L], xs[L], rc[L];
            for (int32_t l = 0; l < L; l++) a0[l] = a1[l] = xs[l] = rc[l] = 0.0f;
            const int32_t ih0 = oh * g->sh - g->pt, iw0 = ow * g->sw - g->pl;
            if (int8)
                for (int32_t kh = 0; kh < g->kh; kh++) {
                    const int32_t ih = ih0 + kh * g->dh;
                    if (ih < 0 || ih >= H) continue;
                    for (int32_t kw = 0; kw < g->kw; kw++) {
                        const int32_t iw = iw0 + kw * g->dw;
                        if (iw < 0 || iw >= W) continue;
                        const float *xv = io.xin + ((size_t)(ih - io.ih_lo) * W + iw) * io.ps;
                        for (int32_t l = 0; l < L; l++) {
                            const float a = fabsf(xv[l]), m = xs[l];
                            xs[l] = a > m ? a : m;
                        }
                    }
                }
            if (int8)
                for (int32_t l = 0; l < L; l++) {
                    rc[l] = patch_r(xs[l]);
                    xs[l] = patch_xs(xs[l]);
                }
            for (int32_t kh = 0; kh < g->kh; kh++) {
                const int32_t ih = ih0 + kh * g->dh;
                if (ih < 0 || ih >= H) continue;
                for (int32_t kw = 0; kw < g->kw; kw++) {
                    const int32_t iw = iw0 + kw * g->dw, t = kh * g->kw + kw;
                    if (iw < 0 || iw >= W) continue;
                    const float *xv = io.xin + ((size_t)(ih - io.ih_lo) * W + iw) * io.ps;
                    const float *wt = w + t * L, *ct = cw + t * L, *st = sw8 + t * L, *lt = live + t * L;
                    if (int8)
                        for (int32_t l = 0; l < L; l++) {
                            const float q = quant_q(xv[l] * rc[l]);
                            a0[l] += q * ct[l];
                            a1[l] += q * st[l];
                        }
                    else
                        for (int32_t l = 0; l < L; l++) {
                            const float prod = xv[l] * wt[l];
                            a0[l] += lt[l] != 0.0f ? prod : 0.0f; /* a zero code adds nothing (inf x too) */
                        }
                }
            }
            float out[L];
            for (int32_t l = 0; l < L; l++) {
                if (!int8)
                    out[l] = p->one_level ? scale[l] * a0[l] + bias[l] : a0[l] + bias[l];
                else if (p->one_level)
                    out[l] = xs[l] * (scale[l] * a1[l]) + bias[l];
                else if (p->two == 1)
                    out[l] = xs[l] * (scale[l] * a0[l] + lamx[l] * a1[l]) + bias[l];
                else
                    out[l] = xs[l] * (scale[l] * a0[l]) + bias[l];
            }
            for (int32_t l = 0; l < L; l++) out[l] = spfq_clamp(out[l], p->lo, p->hi);
            float *yp = io.y + ((size_t)(oh - io.oh_lo) * OW + ow) * io.ys;
            if (io.yl == 1 && nb == L)
                for (int32_t l = 0; l < L; l++) yp[l] = out[l];
            else
                for (int32_t l = 0; l < nb; l++) yp[l * io.yl] = out[l];
        }
}

/* The AVX2 micro-kernel (dwconv_avx2.c) when the CPU has it and the kernels are not pinned to
 * the portable C ISA (spfq_set_isa("c"): the oracle runs everywhere). Bit-identical. */
static void lanes_rows(const spfq_dw *p, int32_t int8, int32_t blk, int32_t nb, lanes_io io, int32_t H, int32_t W,
                       int32_t oh0, int32_t oh1, int32_t OW) {
#if defined(__x86_64__)
    if (spfq_dw_lanes_avx2 && strcmp(spfq_isa(), "c") && __builtin_cpu_supports("avx2")) {
        spfq_dw_lanes_avx2(p, int8, blk, nb, io, H, W, oh0, oh1, OW);
        return;
    }
#endif
    lanes_rows_c(p, int8, blk, nb, io, H, W, oh0, oh1, OW);
}

typedef struct {
    const spfq_dw *p;
    int32_t int8, nhwc, B, H, W, OH, OW, bands;
    int32_t rowmajor; /* NHWC, blocks read in place: units are (image, band), rows outer, blocks inner */
    const float *x;
    float *y;
    int failed;
    /* int8 per pixel (spfq_dwconv_nhwc_act; row-major units only): the input quantised per pixel
     * (x) or given so (xq, xs), dequantised per step of rows; the output quantised per pixel
     * (yq, ys) instead of y */
    int32_t pixel;
    const int8_t *xq;
    const float *xs;
    int8_t *yq;
    float *ys;
} dw_task;

/* Input rows [lo, hi) that output rows [oh0, oh1) read (clipped to the image). */
static void in_rows(const spfq_dw_geom *g, int32_t H, int32_t oh0, int32_t oh1, int32_t *lo, int32_t *hi) {
    int32_t a = oh0 * g->sh - g->pt, b = (oh1 - 1) * g->sh - g->pt + (g->kh - 1) * g->dh + 1;
    *lo = a < 0 ? 0 : a;
    *hi = b > H ? H : b;
    if (*hi < *lo) *hi = *lo;
}

/* One unit of an NHWC call: rows of band `band` of block blk of image bi. The block reads its
 * channels in place when they are DW_LANES consecutive input channels (mult 1, a full block),
 * else gathers them into scratch (lanes past nb read 0). */
static void nhwc_unit(const dw_task *t, int64_t bi, int32_t blk, int32_t band, float *scratch) {
    enum { L = DW_LANES };
    const spfq_dw *p = t->p;
    const int32_t C = p->g.channels, o0 = blk * L, nb = p->n - o0 < L ? p->n - o0 : L;
    const int32_t oh0 = (int32_t)((int64_t)t->OH * band / t->bands), oh1 = (int32_t)((int64_t)t->OH * (band + 1) / t->bands);
    if (oh0 >= oh1) return;
    const float *xb = t->x + (size_t)bi * t->H * t->W * C;
    lanes_io io = {xb + o0, 0, C, t->y + (size_t)bi * t->OH * t->OW * p->n + o0, (size_t)p->n, 1, 0};
    if (p->g.mult != 1 || nb < L) {
        int32_t lo, hi;
        in_rows(&p->g, t->H, oh0, oh1, &lo, &hi);
        int32_t src[L]; /* each lane's input channel (lanes past nb: channel 0, then zeroed) */
        float keep[L];
        for (int32_t l = 0; l < L; l++) {
            src[l] = l < nb ? (o0 + l) / p->g.mult : 0;
            keep[l] = l < nb ? 1.0f : 0.0f;
        }
        for (int32_t i = 0; i < (hi - lo) * t->W; i++) {
            const float *px = xb + ((size_t)lo * t->W + i) * C;
            for (int32_t l = 0; l < L; l++) scratch[(size_t)i * L + l] = keep[l] != 0.0f ? px[src[l]] : 0.0f;
        }
        io.xin = scratch;
        io.ih_lo = lo;
        io.ps = L;
    }
    lanes_rows(p, t->int8, blk, nb, io, t->H, t->W, oh0, oh1, t->OW);
}

/* Output rows per step of a row-major unit: every block runs them before the next rows, so the
 * input rows they read stay in cache across the blocks. */
#define DW_ROWS_STEP 4
/* int8-per-pixel input: a step's input rows are dequantised into scratch (with the halo the
 * next step reads again), so more rows per step */
#define DW_PIXEL_ROWS_STEP 8

/* One row-major NHWC unit: the rows of band `band` of image bi, every block, in place. The
 * AVX-512 16-lane kernel takes weight-only float layers with 16 | n when it is the active ISA. */
/* Input rows [lo, hi) of image bi as the pixel-int8 kernels read them: s * (float)q per pixel,
 * from the given codes or from quantising the float pixels (spfq_quantize_i8 per pixel). */
DW_CLONES static void pixel_rows(const dw_task *t, int64_t bi, int32_t lo, int32_t hi, float *out, int8_t *qtmp,
                                 float *stmp) {
    const int32_t C = t->p->g.channels;
    const size_t first = ((size_t)bi * t->H + lo) * t->W, npix = (size_t)(hi - lo) * t->W;
    const int8_t *q = t->xq ? t->xq + first * C : qtmp;
    const float *sc = t->xq ? t->xs + first : stmp;
    if (!t->xq) spfq_quant_rows((int32_t)npix, C, t->x + first * C, (size_t)C, qtmp, (size_t)C, stmp);
    for (size_t i = 0; i < npix; i++)
        for (int32_t c = 0; c < C; c++) out[i * C + c] = sc[i] * (float)q[i * C + c];
}

static void nhwc_rows_unit(const dw_task *t, int64_t bi, int32_t band) {
    enum { L = DW_LANES };
    const spfq_dw *p = t->p;
    const int32_t C = p->g.channels;
    const int32_t oh0 = (int32_t)((int64_t)t->OH * band / t->bands), oh1 = (int32_t)((int64_t)t->OH * (band + 1) / t->bands);
    const float *xb = t->x ? t->x + (size_t)bi * t->H * t->W * C : NULL;
    float *yb = t->y ? t->y + (size_t)bi * t->OH * t->OW * p->n : NULL;
    const int32_t step = t->pixel ? DW_PIXEL_ROWS_STEP : DW_ROWS_STEP;
    float *xin = NULL, *ytmp = NULL, *stmp = NULL;
    int8_t *qtmp = NULL;
    if (t->pixel) { /* one step's input rows, dequantised */
        const size_t in_rows_max = (size_t)(step - 1) * p->g.sh + (size_t)(p->g.kh - 1) * p->g.dh + 1;
        const size_t npix = in_rows_max * t->W;
        xin = spfq_scratch(SPFQ_SCR_DW_XIN, npix * C * sizeof(float), 0);
        qtmp = t->xq ? NULL : spfq_scratch(SPFQ_SCR_DW_QTMP, npix * C, 0);
        stmp = t->xq ? NULL : spfq_scratch(SPFQ_SCR_DW_STMP, npix * sizeof(float), 0);
    }
    if (t->yq) ytmp = spfq_scratch(SPFQ_SCR_DW_YTMP, (size_t)step * t->OW * p->n * sizeof(float), 0); /* one step's output rows */
    if ((t->pixel && (!xin || (!t->xq && (!qtmp || !stmp)))) || (t->yq && !ytmp)) {
        __atomic_store_n((int *)&t->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    const float *zero = NULL, **taps = NULL;
#if defined(__x86_64__)
    if (!t->int8 && p->lane16 && spfq_dw_rows16_avx512 && spfq_isa_avx512()) {
        zero = spfq_scratch(SPFQ_SCR_DW_ZERO, (size_t)C * sizeof(float), 1);
        taps = spfq_scratch(SPFQ_SCR_DW_TAPS, (size_t)t->OW * (size_t)p->k * sizeof *taps, 0);
        if (!zero || !taps) zero = NULL;
    }
#endif
    for (int32_t r0 = oh0; r0 < oh1; r0 += step) {
        const int32_t r1 = oh1 - r0 < step ? oh1 : r0 + step;
        const float *x = xb;
        float *y = yb;
        int32_t lo = 0, ylo = 0;
        if (t->pixel) {
            int32_t hi;
            in_rows(&p->g, t->H, r0, r1, &lo, &hi);
            pixel_rows(t, bi, lo, hi, xin, qtmp, stmp);
            x = xin;
        }
        if (ytmp) {
            y = ytmp;
            ylo = r0;
        }
        if (zero) {
            lanes_io io = {x, lo, C, y, (size_t)p->n, 1, ylo};
            spfq_dw_rows16_avx512(p, io, t->H, t->W, r0, r1, t->OW, zero, taps);
        } else {
            for (int32_t blk = 0; blk < p->nblk; blk++) {
                lanes_io io = {x + blk * L, lo, C, y + blk * L, (size_t)p->n, 1, ylo};
                lanes_rows(p, t->int8, blk, L, io, t->H, t->W, r0, r1, t->OW);
            }
        }
        if (p->act) /* this step's output rows, while they are in cache */
            spfq_apply_act(p->act, p->act_slope, (r1 - r0) * t->OW, 0, p->n,
                           ytmp ? ytmp : yb + (size_t)r0 * t->OW * p->n, (size_t)p->n);
        if (ytmp) { /* the next layer's quantisation of these pixels */
            const size_t first = ((size_t)bi * t->OH + r0) * t->OW;
            spfq_quant_rows((r1 - r0) * t->OW, p->n, ytmp, (size_t)p->n, t->yq + first * p->n, (size_t)p->n,
                            t->ys + first);
        }
    }
}

/* One NCHW block of DW_LANES outputs of one image, narrow planes: interleave, then the lanes. */
static void nchw_block(const dw_task *t, int64_t bi, int32_t blk, float *scratch) {
    enum { L = DW_LANES };
    const spfq_dw *p = t->p;
    const int32_t o0 = blk * L, nb = p->n - o0 < L ? p->n - o0 : L, HW = t->H * t->W;
    const float *xb = t->x + (size_t)bi * p->g.channels * (size_t)HW;
    for (int32_t l = 0; l < L; l++) {
        const float *plane = xb + (size_t)((o0 + (l < nb ? l : 0)) / p->g.mult) * HW;
        for (int32_t i = 0; i < HW; i++) scratch[(size_t)i * L + l] = l < nb ? plane[i] : 0.0f;
    }
    const size_t P = (size_t)t->OH * t->OW;
    lanes_io io = {scratch, 0, L, t->y + ((size_t)bi * p->n + o0) * P, 1, P, 0};
    lanes_rows(p, t->int8, blk, nb, io, t->H, t->W, 0, t->OH, t->OW);
}

/* Units: NHWC read in place (image, band), rows outer; NHWC gathered (image, block, band); NCHW narrow planes (image, block); NCHW wide planes
 * (image, output channel), one row at a time. Chunk `chunk` of nchunks runs a range of them. */
static int64_t dw_units(const dw_task *t) {
    const spfq_dw *p = t->p;
    if (t->rowmajor) return (int64_t)t->B * t->bands;
    if (t->nhwc) return (int64_t)t->B * p->nblk * t->bands;
    return (int64_t)t->B * (t->OW < DW_LANES_BELOW ? p->nblk : p->n);
}

static void dw_chunk(void *ctx, int32_t chunk, int32_t nchunks) {
    dw_task *t = ctx;
    const spfq_dw *p = t->p;
    const int64_t units = dw_units(t), a = units * chunk / nchunks, b = units * (chunk + 1) / nchunks;
    const int lanes = t->nhwc || t->OW < DW_LANES_BELOW;
    size_t scratch = lanes ? (size_t)t->H * t->W * DW_LANES : (t->int8 ? 4 * (size_t)t->OW : 0);
    if (t->nhwc && p->g.mult == 1 && p->n % DW_LANES == 0) scratch = 0;
    float *tmp = scratch ? malloc(scratch * sizeof(float)) : NULL;
    if (scratch && !tmp) {
        __atomic_store_n(&t->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t i = a; i < b; i++) {
        if (t->rowmajor) {
            nhwc_rows_unit(t, i / t->bands, (int32_t)(i % t->bands));
            continue;
        }
        if (t->nhwc) {
            const int64_t per_b = (int64_t)p->nblk * t->bands;
            nhwc_unit(t, i / per_b, (int32_t)(i % per_b / t->bands), (int32_t)(i % t->bands), tmp);
            continue;
        }
        if (lanes) {
            nchw_block(t, i / p->nblk, (int32_t)(i % p->nblk), tmp);
            continue;
        }
        const int64_t bi = i / p->n;
        const int32_t o = (int32_t)(i % p->n);
        const float *plane = t->x + ((size_t)bi * p->g.channels + (size_t)(o / p->g.mult)) * t->H * t->W;
        float *yp = t->y + ((size_t)bi * p->n + o) * (size_t)t->OH * t->OW;
        for (int32_t oh = 0; oh < t->OH; oh++) {
            if (t->int8)
                row_i8(p, o, plane, t->H, t->W, oh, t->OW, yp + (size_t)oh * t->OW, tmp);
            else
                row_f32(p, o, plane, t->H, t->W, oh, t->OW, yp + (size_t)oh * t->OW);
        }
    }
    free(tmp);
}

/* The call's geometry checks and thread split; pix (or NULL): the pixel-int8 fields. */
static int dw_run(const spfq_dw *p, int32_t int8, int32_t nhwc, int32_t b, int32_t h, int32_t w, const float *x,
                  float *y, const dw_task *pix, int32_t nthreads) {
    if (!p || b < 0 || h < 1 || w < 1 || (!x && !pix) || (!y && !pix)) return SPFQ_EINVAL;
    const spfq_dw_geom *g = &p->g;
    const int64_t OH = ((int64_t)h + g->pt + g->pb - (int64_t)g->dh * (g->kh - 1) - 1) / g->sh + 1;
    const int64_t OW = ((int64_t)w + g->pl + g->pr - (int64_t)g->dw * (g->kw - 1) - 1) / g->sw + 1;
    if (OH < 1 || OW < 1 || OH > INT32_MAX || OW > INT32_MAX) return SPFQ_EINVAL;
    if (!b) return SPFQ_OK;
    dw_task t = {p, int8 != 0, nhwc, b, h, w, (int32_t)OH, (int32_t)OW, 1, 0, x, y, 0, 0, NULL, NULL, NULL, NULL};
    if (pix) {
        t.pixel = pix->pixel;
        t.xq = pix->xq;
        t.xs = pix->xs;
        t.yq = pix->yq;
        t.ys = pix->ys;
    }
    t.rowmajor = nhwc && p->g.mult == 1 && p->n % DW_LANES == 0;
    nthreads = spfq_threads_for((int64_t)b * OH * OW * p->n * p->k, nthreads);
    int64_t chunks = nthreads <= 1 ? 1 : 4 * (int64_t)nthreads;
    if (t.rowmajor && chunks > b) { /* bands of rows so that every thread has work */
        const int64_t bands = (chunks + b - 1) / b;
        t.bands = (int32_t)(bands < OH ? bands : OH);
    } else if (nhwc && !t.rowmajor && chunks > (int64_t)b * p->nblk) {
        const int64_t bands = (chunks + (int64_t)b * p->nblk - 1) / ((int64_t)b * p->nblk);
        t.bands = (int32_t)(bands < OH ? bands : OH);
    }
    const int64_t units = dw_units(&t);
    if (chunks > units) chunks = units;
    spfq_pool_run(nthreads, (int32_t)chunks, dw_chunk, &t);
    if (t.failed) return SPFQ_ENOMEM;
    if (p->act && !t.rowmajor) /* (row-major units applied it per step) */
        spfq_act_output(p->act, p->act_slope, nhwc, b, p->n, (size_t)OH * (size_t)OW, y);
    return SPFQ_OK;
}

int spfq_dwconv(const spfq_dw *p, int32_t int8, int32_t b, int32_t h, int32_t w, const float *x, float *y,
                int32_t nthreads) {
    return dw_run(p, int8, 0, b, h, w, x, y, NULL, nthreads);
}

int spfq_dwconv_nhwc(const spfq_dw *p, int32_t int8, int32_t b, int32_t h, int32_t w, const float *x, float *y,
                     int32_t nthreads) {
    return dw_run(p, int8, 1, b, h, w, x, y, NULL, nthreads);
}

int spfq_dwconv_nhwc_act(const spfq_dw *p, int32_t int8_pixel, int32_t b, int32_t h, int32_t w, const spfq_act *a,
                         int32_t nthreads) {
    if (!p || !a || b < 0 || h < 1 || w < 1 || (!a->x == !(a->xq && a->xscale)) || (a->x && (a->xq || a->xscale)) ||
        (!a->y == !(a->yq && a->yscale)) || (a->y && (a->yq || a->yscale)) || (!int8_pixel && !a->x))
        return SPFQ_EINVAL;
    const dw_task pix = {.pixel = int8_pixel != 0, .xq = a->xq, .xs = a->xscale, .yq = a->yq, .ys = a->yscale};
    if (p->g.mult == 1 && p->n % DW_LANES == 0) /* row-major units: per step of rows, in cache */
        return dw_run(p, 0, 1, b, h, w, a->x, a->y, &pix, nthreads);
    /* gathered blocks: the whole input dequantised first, the whole output quantised after */
    const spfq_dw_geom *g = &p->g;
    const size_t npix = (size_t)b * h * w, C = (size_t)g->channels;
    const int64_t OH = ((int64_t)h + g->pt + g->pb - (int64_t)g->dh * (g->kh - 1) - 1) / g->sh + 1;
    const int64_t OW = ((int64_t)w + g->pl + g->pr - (int64_t)g->dw * (g->kw - 1) - 1) / g->sw + 1;
    if (OH < 1 || OW < 1) return SPFQ_EINVAL;
    const size_t nout = (size_t)b * (size_t)OH * (size_t)OW;
    float *xin = malloc(npix * C * sizeof(float) + 1), *sc = a->x ? malloc(npix * sizeof(float) + 1) : NULL;
    int8_t *q = a->x ? malloc(npix * C + 1) : NULL;
    float *y = a->y ? a->y : malloc(nout * (size_t)p->n * sizeof(float) + 1);
    int rc = SPFQ_ENOMEM;
    if (xin && y && (!a->x || (sc && q))) {
        if (!int8_pixel) {
            memcpy(xin, a->x, npix * C * sizeof(float));
        } else {
            if (a->x) spfq_quant_rows((int32_t)npix, (int32_t)C, a->x, C, q, C, sc);
            const int8_t *qq = a->x ? q : a->xq;
            const float *ss = a->x ? sc : a->xscale;
            for (size_t i = 0; i < npix; i++)
                for (size_t c = 0; c < C; c++) xin[i * C + c] = ss[i] * (float)qq[i * C + c];
        }
        rc = dw_run(p, 0, 1, b, h, w, xin, y, NULL, nthreads);
        if (rc == SPFQ_OK && a->yq) spfq_quant_rows((int32_t)nout, p->n, y, (size_t)p->n, a->yq, (size_t)p->n, a->yscale);
    }
    free(xin);
    free(sc);
    free(q);
    if (y != a->y) free(y);
    return rc;
}
