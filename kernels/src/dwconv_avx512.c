/* dwconv_avx512.c — the weight-only float depthwise micro-kernel for channels-last input on
 * AVX-512, in the style of XNNPACK's depthwise kernels: per output pixel an indirection list of
 * its taps' input pixels (a zero row for taps in the padding), then 16 channels per zmm across
 * the whole channel row, two output pixels at a time so each weight vector load serves both. The
 * weights of a 16-channel block are in lane order (dwconv.c lane_order16) and stay in L1; the
 * input rows a row of outputs reads stay in L1/L2 while every channel of them is used.
 *
 * Bit-identical with the portable lanes kernel (dwconv.c lanes_rows_c): taps in column order,
 * each adding x * w (a multiply, then an add: no fused multiply-add). A padding tap adds x = 0,
 * and a zero code weight 0, i.e. +-0 products, which leave a sum that starts at +0 unchanged (a
 * sum of finite terms is never -0). Only an infinite or NaN x on a zero code differs (a NaN
 * output where the oracle skips the tap); such an output block is recomputed over its live taps.
 */
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "dwconv.h"

#define TGT __attribute__((target("avx512f")))

/* NB consecutive 16-channel blocks from block b0 of P output pixels whose k taps read in[i][t]
 * + channel: NB * P independent accumulator chains (the adds of one chain are in tap order, so
 * the chains, not the taps, give the parallelism that hides the add latency). */
__attribute__((always_inline)) TGT static inline void blocks(const struct spfq_dw *p, int32_t k, const int NB,
                                                            const int P, const float *const *const *in, int32_t b0,
                                                            float *const *y, __m512 clo, __m512 chi, const int KC) {
    if (KC) k = KC; /* 3x3 and 5x5 compiled with a constant tap count: the tap loop unrolls */
    const size_t per = (2 * (size_t)k + 2) * 16;
    const float *w[4];
    __m512 acc[4][4];
    for (int j = 0; j < NB; j++) {
        w[j] = p->lane16 + (size_t)(b0 + j) * per;
        for (int i = 0; i < P; i++) acc[j][i] = _mm512_setzero_ps();
    }
    for (int32_t t = 0; t < k; t++)
        for (int j = 0; j < NB; j++) {
            const __m512 wv = _mm512_loadu_ps(w[j] + t * 16);
            for (int i = 0; i < P; i++)
                acc[j][i] = _mm512_add_ps(acc[j][i], _mm512_mul_ps(_mm512_loadu_ps(in[i][t] + (size_t)(b0 + j) * 16), wv));
        }
    for (int j = 0; j < NB; j++) {
        const float *live = w[j] + (size_t)k * 16, *e = live + (size_t)k * 16;
        const __m512 scale = _mm512_loadu_ps(e), bias = _mm512_loadu_ps(e + 16);
        const size_t c = (size_t)(b0 + j) * 16;
        for (int i = 0; i < P; i++) {
            __m512 a = acc[j][i];
            if (!p->dense16[b0 + j] && _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q)) { /* redo over the live taps */
                a = _mm512_setzero_ps();
                for (int32_t t = 0; t < k; t++) {
                    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(live + t * 16), _mm512_setzero_ps(), _CMP_NEQ_UQ);
                    a = _mm512_mask_add_ps(a, m, a, _mm512_mul_ps(_mm512_loadu_ps(in[i][t] + c), _mm512_loadu_ps(w[j] + t * 16)));
                }
            }
            const __m512 out = p->one_level ? _mm512_add_ps(_mm512_mul_ps(scale, a), bias) : _mm512_add_ps(a, bias);
            _mm512_storeu_ps(y[i] + c, _mm512_min_ps(chi, _mm512_max_ps(clo, out))); /* spfq_clamp */
        }
    }
}

#define BLOCKS_FN(NB, P)                                                                                    \
    __attribute__((noinline)) TGT static void blocks_##NB##_##P(const struct spfq_dw *p, int32_t k,            \
                                                               const float *const *const *in, int32_t b0,   \
                                                               float *const *y, __m512 clo, __m512 chi) {   \
        if (k == 9)                                                                                         \
            blocks(p, k, NB, P, in, b0, y, clo, chi, 9);                                                    \
        else if (k == 25)                                                                                   \
            blocks(p, k, NB, P, in, b0, y, clo, chi, 25);                                                   \
        else                                                                                                \
            blocks(p, k, NB, P, in, b0, y, clo, chi, 0);                                                    \
    }
BLOCKS_FN(1, 1) BLOCKS_FN(2, 1) BLOCKS_FN(3, 1) BLOCKS_FN(4, 1)
BLOCKS_FN(1, 2) BLOCKS_FN(2, 2) BLOCKS_FN(3, 2) BLOCKS_FN(4, 2)
BLOCKS_FN(1, 4) BLOCKS_FN(2, 4)

typedef void (*blocks_fn)(const struct spfq_dw *, int32_t, const float *const *const *, int32_t, float *const *,
                          __m512, __m512);

/* The taps of output pixel (oh, ow): input pixel pointers (at channel 0), `zero` for padding. */
static void taps(const struct spfq_dw *p, lanes_io io, int32_t H, int32_t W, int32_t oh, int32_t ow, const float *zero,
                 const float **in) {
    const spfq_dw_geom *g = &p->g;
    const int32_t ih0 = oh * g->sh - g->pt, iw0 = ow * g->sw - g->pl;
    for (int32_t kh = 0; kh < g->kh; kh++) {
        const int32_t ih = ih0 + kh * g->dh;
        for (int32_t kw = 0; kw < g->kw; kw++) {
            const int32_t iw = iw0 + kw * g->dw;
            *in++ = (ih < 0 || ih >= H || iw < 0 || iw >= W) ? zero
                  : io.xin + ((size_t)(ih - io.ih_lo) * W + iw) * io.ps;
        }
    }
}

/* Output rows [oh0, oh1), every 16-channel block (p->n % 16 == 0), x NHWC read in place (pixel
 * stride io.ps = channels, io.xin at channel 0), y NHWC (io.ys = n). zero: n zero floats. Per
 * output row: the taps of every pixel once, then for each group of 4 blocks (64 channels; 2 when
 * the layer has fewer than 4) the whole row, 2 pixels at a time (4 with 2-block groups): 8
 * accumulator chains, and the input rows' 64-channel slices stay in L1 for the row. */
TGT void spfq_dw_rows16_avx512(const struct spfq_dw *p, lanes_io io, int32_t H, int32_t W, int32_t oh0, int32_t oh1,
                               int32_t OW, const float *zero, const float **tp) {
    static const blocks_fn by_p1[5] = {NULL, blocks_1_1, blocks_2_1, blocks_3_1, blocks_4_1};
    static const blocks_fn by_p2[5] = {NULL, blocks_1_2, blocks_2_2, blocks_3_2, blocks_4_2};
    static const blocks_fn by_p4[3] = {NULL, blocks_1_4, blocks_2_4};
    const int32_t k = p->k, nb = p->n / 16;
    const int P = nb >= 4 ? 2 : 4, most = P == 4 ? 2 : 4;
    const __m512 clo = _mm512_set1_ps(p->lo), chi = _mm512_set1_ps(p->hi);
    for (int32_t oh = oh0; oh < oh1; oh++) {
        float *yrow = io.y + (size_t)(oh - io.oh_lo) * OW * io.ys;
        /* interior columns read the previous column's taps moved by one stride */
        const spfq_dw_geom *g = &p->g;
        const int32_t ih0 = oh * g->sh - g->pt, ih1 = ih0 + (g->kh - 1) * g->dh;
        for (int32_t ow = 0; ow < OW; ow++) {
            const int32_t iw0 = ow * g->sw - g->pl, iw1 = iw0 + (g->kw - 1) * g->dw;
            const float **cur = tp + (size_t)ow * k;
            if (ow > 0 && ih0 >= 0 && ih1 < H && iw0 - g->sw >= 0 && iw1 < W) {
                const size_t step = (size_t)g->sw * io.ps;
                for (int32_t t = 0; t < k; t++) cur[t] = cur[t - k] + step;
            } else {
                taps(p, io, H, W, oh, ow, zero, cur);
            }
        }
        for (int32_t b0 = 0; b0 < nb;) {
            const int32_t g = nb - b0 < most ? nb - b0 : most;
            for (int32_t ow = 0; ow < OW;) {
                const int q = OW - ow >= P ? P : OW - ow >= 2 ? 2 : 1;
                const float *const *in[4];
                float *y[4];
                for (int i = 0; i < q; i++) {
                    in[i] = tp + (size_t)(ow + i) * k;
                    y[i] = yrow + (size_t)(ow + i) * io.ys;
                }
                (q == 4 ? by_p4 : q == 2 ? by_p2 : by_p1)[g](p, k, in, b0, y, clo, chi);
                ow += q;
            }
            b0 += g;
        }
    }
}
#endif
