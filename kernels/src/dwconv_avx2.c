/* dwconv_avx2.c — the depthwise lanes micro-kernel (dwconv.c lanes_rows_c) in AVX2 intrinsics:
 * 8 output channels per ymm, up to four neighbouring output pixels at a time where they read
 * the same taps (interleaved: their dependency chains overlap); the taps of a row's interior
 * columns are listed once per row, a border pixel lists its valid ones.
 *
 * Bit-identical with the portable kernel (and so with the im2col GEMM oracle):
 *   f32: taps in column order, each adding x * w or +0 (zero code), no fused multiply-add
 *        (target avx2 without fma: GCC does not contract);
 *   i8:  quant.c's rule: per patch r = 127 / amax, q = x * r rounded to nearest even (one
 *        multiply and one rounding per tap, the same IEEE operations as the portable kernel's);
 *        the integer sums are exact, the epilogue the same float expression.
 */
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>

#include "dwconv.h"

#define TGT __attribute__((target("avx2")))

TGT static inline __m256 absf(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

/* P output pixels (f32: 1, 2 or 4; i8: 1 or 2) through the taps tap[0..nt) at xp[j] + off[i]
 * (pixel i). dense: the block has no zero code (f32 then needs no mask). */
typedef struct {
    const float *w, *cw, *sw8, *live;
    __m256 scale, lamx, bias;
    int one, two, dense;
} lanes_w;

__attribute__((always_inline)) TGT static inline void pix_f32(const lanes_w *lw, int P, int32_t nt,
                                                             const int32_t *tap, const float *const *xp,
                                                             const size_t *off, __m256 *out) {
    enum { L = DW_LANES };
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    if (lw->dense)
        for (int32_t j = 0; j < nt; j++) {
            const __m256 wv = _mm256_loadu_ps(lw->w + tap[j] * L);
            for (int i = 0; i < P; i++)
                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_loadu_ps(xp[j] + off[i]), wv));
        }
    else
        for (int32_t j = 0; j < nt; j++) {
            const int32_t t = tap[j];
            const __m256 wv = _mm256_loadu_ps(lw->w + t * L);
            const __m256 m = _mm256_cmp_ps(_mm256_loadu_ps(lw->live + t * L), _mm256_setzero_ps(), _CMP_NEQ_UQ);
            for (int i = 0; i < P; i++) /* a zero code adds +0 (inf x too) */
                acc[i] = _mm256_add_ps(acc[i], _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(xp[j] + off[i]), wv), m));
        }
    for (int i = 0; i < P; i++)
        out[i] = lw->one ? _mm256_add_ps(_mm256_mul_ps(lw->scale, acc[i]), lw->bias) : _mm256_add_ps(acc[i], lw->bias);
}

/* The int8 pixels: per patch xs = amax / 127, r = 127 / amax (0, 0 below 2^-100), q = x * r
 * rounded to nearest even (0 for NaN: an infinite x in an infinite patch), as quant.c. */
__attribute__((always_inline)) TGT static inline void pix_i8(const lanes_w *lw, int P, int32_t nt, const int32_t *tap,
                                                            const float *const *xp, const size_t *off, __m256 *out) {
    enum { L = DW_LANES };
    __m256 xs[2], r[2], a0[2], a1[2];
    for (int i = 0; i < P; i++) {
        __m256 amax = _mm256_setzero_ps();
        for (int32_t j = 0; j < nt; j++) amax = _mm256_max_ps(absf(_mm256_loadu_ps(xp[j] + off[i])), amax);
        const __m256 ok = _mm256_cmp_ps(amax, _mm256_set1_ps(0x1p-100f), _CMP_GE_OQ);
        xs[i] = _mm256_and_ps(_mm256_div_ps(amax, _mm256_set1_ps(127.0f)), ok);
        r[i] = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(127.0f), amax), ok);
        a0[i] = a1[i] = _mm256_setzero_ps();
    }
    for (int32_t j = 0; j < nt; j++) {
        const int32_t t = tap[j];
        const __m256 c = _mm256_loadu_ps(lw->cw + t * L), sg = _mm256_loadu_ps(lw->sw8 + t * L);
        for (int i = 0; i < P; i++) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xp[j] + off[i]), r[i]);
            __m256 q = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
            q = _mm256_and_ps(q, _mm256_cmp_ps(v, v, _CMP_ORD_Q)); /* NaN -> 0 */
            if (lw->two) a0[i] = _mm256_add_ps(a0[i], _mm256_mul_ps(q, c));
            if (lw->two != 2) a1[i] = _mm256_add_ps(a1[i], _mm256_mul_ps(q, sg));
        }
    }
    for (int i = 0; i < P; i++) {
        if (lw->one)
            out[i] = _mm256_add_ps(_mm256_mul_ps(xs[i], _mm256_mul_ps(lw->scale, a1[i])), lw->bias);
        else if (lw->two == 1)
            out[i] = _mm256_add_ps(_mm256_mul_ps(xs[i], _mm256_add_ps(_mm256_mul_ps(lw->scale, a0[i]),
                                                                     _mm256_mul_ps(lw->lamx, a1[i]))), lw->bias);
        else
            out[i] = _mm256_add_ps(_mm256_mul_ps(xs[i], _mm256_mul_ps(lw->scale, a0[i])), lw->bias);
    }
}

/* The clamp (spfq_clamp: max(lo, v) and min(hi, v) keep a NaN v), then the store. */
TGT static inline void store(lanes_io io, int32_t nb, size_t pix, __m256 out, __m256 lo, __m256 hi) {
    out = _mm256_min_ps(hi, _mm256_max_ps(lo, out));
    float *yp = io.y + pix * io.ys;
    if (io.yl == 1 && nb == DW_LANES) {
        _mm256_storeu_ps(yp, out);
        return;
    }
    float o8[DW_LANES];
    _mm256_storeu_ps(o8, out);
    for (int32_t l = 0; l < nb; l++) yp[l * io.yl] = o8[l];
}

/* The interior pixels [pix, pix + n) (n a multiple of 4) of a 3x3 f32 row, weights in registers
 * with zero codes as 0 and no mask: x * 0 adds +-0, which leaves a sum that starts at +0 unchanged
 * (a sum of finite terms is never -0), so only an infinite or NaN x on a zero code differs (NaN);
 * a pixel whose output is NaN is recomputed by pix_f32's masked taps. d: pixel pix's offset
 * from rxp[], step: the next pixel's, dx: the next column's. */
TGT static void interior3x3_f32(const lanes_w *lw, const __m256 *w9, const int32_t *rtap, const float *const *rxp,
                               size_t d, size_t step, size_t dx, int32_t n, lanes_io io, int32_t nb, size_t pix,
                               __m256 clo, __m256 chi) {
    for (int32_t i = 0; i < n; i += 4, d += 4 * step, pix += 4) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#pragma GCC unroll 3
        for (int kh = 0; kh < 3; kh++) {
            const float *r = rxp[3 * kh] + d;
#pragma GCC unroll 3
            for (int kw = 0; kw < 3; kw++) {
                const __m256 wv = w9[3 * kh + kw];
#pragma GCC unroll 4
                for (int q = 0; q < 4; q++)
                    acc[q] = _mm256_add_ps(acc[q], _mm256_mul_ps(_mm256_loadu_ps(r + q * step + kw * dx), wv));
            }
        }
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
            __m256 out = lw->one ? _mm256_add_ps(_mm256_mul_ps(lw->scale, acc[q]), lw->bias) : _mm256_add_ps(acc[q], lw->bias);
            if (_mm256_movemask_ps(_mm256_cmp_ps(out, out, _CMP_UNORD_Q))) {
                const size_t off = d + q * step;
                pix_f32(lw, 1, 9, rtap, rxp, &off, &out);
            }
            store(io, nb, pix + q, out, clo, chi);
        }
    }
}

TGT void spfq_dw_lanes_avx2(const struct spfq_dw *p, int32_t int8, int32_t blk, int32_t nb, lanes_io io, int32_t H,
                            int32_t W, int32_t oh0, int32_t oh1, int32_t OW) {
    enum { L = DW_LANES };
    const spfq_dw_geom *g = &p->g;
    const int32_t k = p->k;
    lanes_w lw;
    lw.w = p->lane + (size_t)blk * (4 * (size_t)k + 3) * L;
    lw.cw = lw.w + (size_t)k * L;
    lw.sw8 = lw.cw + (size_t)k * L;
    lw.live = lw.sw8 + (size_t)k * L;
    const float *e = lw.live + (size_t)k * L;
    lw.scale = _mm256_loadu_ps(e), lw.lamx = _mm256_loadu_ps(e + L), lw.bias = _mm256_loadu_ps(e + 2 * L);
    lw.one = p->one_level, lw.two = p->two;
    lw.dense = 1;
    for (int32_t i = 0; i < k * L; i++) lw.dense &= lw.live[i] != 0.0f;
    int32_t tap[DW_MAX_TAPS], rtap[DW_MAX_TAPS];
    const float *xp[DW_MAX_TAPS], *rxp[DW_MAX_TAPS];
    /* output columns whose taps all lie inside the image width */
    const int32_t lo = g->pl <= 0 ? 0 : (g->pl + g->sw - 1) / g->sw;
    const int32_t span = (g->kw - 1) * g->dw - g->pl; /* iw0 + (kw-1) dw = ow sw + span < W */
    int32_t hi = W - 1 - span < 0 ? 0 : (W - 1 - span) / g->sw + 1;
    if (hi > OW) hi = OW;
    const size_t step = (size_t)g->sw * io.ps, one_off[1] = {0};
    const __m256 clo = _mm256_set1_ps(p->lo), chi = _mm256_set1_ps(p->hi);
    const int fast3 = !int8 && g->kh == 3 && g->kw == 3;
    __m256 w9[9];
    for (int32_t t = 0; fast3 && t < 9; t++)
        w9[t] = _mm256_and_ps(_mm256_loadu_ps(lw.w + t * L),
                              _mm256_cmp_ps(_mm256_loadu_ps(lw.live + t * L), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    for (int32_t oh = oh0; oh < oh1; oh++) {
        const int32_t ih0 = oh * g->sh - g->pt;
        /* the taps of this row's interior columns, at column lo (shifted by off[] below) */
        int32_t rnt = 0;
        for (int32_t kh = 0; kh < g->kh && lo < hi; kh++) {
            const int32_t ih = ih0 + kh * g->dh;
            if (ih < 0 || ih >= H) continue;
            const float *row = io.xin + (size_t)(ih - io.ih_lo) * W * io.ps;
            for (int32_t kw = 0; kw < g->kw; kw++) {
                rtap[rnt] = kh * g->kw + kw;
                rxp[rnt++] = row + (size_t)(lo * g->sw - g->pl + kw * g->dw) * io.ps;
            }
        }
        int32_t ow = 0;
        while (ow < OW) {
            __m256 out[4];
            int P = 1;
            if (fast3 && rnt == 9 && ow >= lo && hi - ow >= 4) { /* a whole 3x3 row interior */
                const int32_t n = (hi - ow) & ~3;
                interior3x3_f32(&lw, w9, rtap, rxp, (size_t)(ow - lo) * step, step, (size_t)g->dw * io.ps, n, io, nb,
                                (size_t)(oh - io.oh_lo) * OW + ow, clo, chi);
                ow += n;
                continue;
            }
            if (ow >= lo && ow < hi) { /* interior: every tap of the row valid */
                const int32_t room = hi - ow, most = int8 ? 2 : 4;
                P = room >= most ? most : (room >= 2 ? 2 : 1);
                const size_t d = (size_t)(ow - lo) * step;
                const size_t off[4] = {d, d + step, d + 2 * step, d + 3 * step};
                if (int8) {
                    if (P == 2) pix_i8(&lw, 2, rnt, rtap, rxp, off, out);
                    else pix_i8(&lw, 1, rnt, rtap, rxp, off, out);
                } else if (P == 4) {
                    pix_f32(&lw, 4, rnt, rtap, rxp, off, out);
                } else if (P == 2) {
                    pix_f32(&lw, 2, rnt, rtap, rxp, off, out);
                } else {
                    pix_f32(&lw, 1, rnt, rtap, rxp, off, out);
                }
            } else { /* a border column: its valid taps, in column order */
                const int32_t iw0 = ow * g->sw - g->pl;
                int32_t nt = 0;
                for (int32_t kh = 0; kh < g->kh; kh++) {
                    const int32_t ih = ih0 + kh * g->dh;
                    if (ih < 0 || ih >= H) continue;
                    const float *row = io.xin + (size_t)(ih - io.ih_lo) * W * io.ps;
                    for (int32_t kw = 0; kw < g->kw; kw++) {
                        const int32_t iw = iw0 + kw * g->dw;
                        if (iw < 0 || iw >= W) continue;
                        tap[nt] = kh * g->kw + kw;
                        xp[nt++] = row + (size_t)iw * io.ps;
                    }
                }
                if (int8) pix_i8(&lw, 1, nt, tap, xp, one_off, out);
                else pix_f32(&lw, 1, nt, tap, xp, one_off, out);
            }
            for (int i = 0; i < P; i++) store(io, nb, (size_t)(oh - io.oh_lo) * OW + ow + i, out[i], clo, chi);
            ow += P;
        }
    }
}
#endif
